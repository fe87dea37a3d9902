"""Checkpoints that survive a kill: written to a temp folder, fsynced, then renamed into place.

Layout of `run_dir/checkpoints/step_{N:07d}/`:
    model.safetensors   the distiller's weights (student + projectors; never the teacher)
    optimizer.pt        optimizer state_dict   (tensors and numbers only: loads with weights_only)
    scheduler.pt        lr scheduler state_dict
    scaler.json         the fp16 loss scaler's state (scale, growth tracker), when the run has one
    rng_{rank}.pt       each process's python / numpy / torch (/ cuda) RNG states
    state.json          step, data position, elapsed time, the open logging window; written last
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

CHECKPOINT_NAME = re.compile(r"^step_(\d{7})$")
SCALER_FILE = "scaler.json"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (those with a state.json), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def remove_leftovers(run_dir: Path) -> None:
    """Delete temp and trash folders a killed run left behind (main process, before training)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp_", ".trash_")):
                shutil.rmtree(path, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain tensors and numbers (safe for weights_only loading)."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
         numpy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never publishes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f".tmp_step_{step:07d}"


def write_rng(folder: Path, rank: int) -> None:
    """Every process writes its own RNG file into the temp folder."""
    path = folder / f"rng_{rank}.pt"
    torch.save(capture_rng(), path)
    _fsync(path)


def write_main_files(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    scaler_state: dict[str, Any] | None = None,
) -> None:
    """The shared part, written by the main process; state.json last, as the completeness mark.

    scaler_state: the fp16 GradScaler's state_dict (numbers only), or None without a scaler."""
    save_model(model, str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    names = ["model.safetensors", "optimizer.pt", "scheduler.pt"]
    if scaler_state is not None:
        (folder / SCALER_FILE).write_text(json.dumps(scaler_state, indent=1))
        names.append(SCALER_FILE)
    for name in names:
        _fsync(folder / name)
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    _fsync(folder / "state.json")


def publish(folder: Path, final: Path, keep: int) -> None:
    """Atomically rename the finished temp folder to `final`, then drop all but the last `keep`."""
    root = final.parent
    if final.exists():  # re-saving the same step (resumed at the end): move the old one aside first
        trash = root / f".trash_{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, final)
    _fsync(root)
    for old in list_checkpoints(root.parent)[:-keep]:
        trash = root / f".trash_{old.name}"
        os.rename(old, trash)  # renamed first so a kill mid-delete never leaves a half checkpoint
        shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load weights, optimizer and scheduler in place; return (state.json, this rank's RNG state).

    The RNG state is returned rather than applied so the caller restores it right before the
    first resumed step, after any set-up that may draw random numbers.
    """
    state = json.loads((folder / "state.json").read_text())
    load_model(model, str(folder / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_path = folder / f"rng_{rank}.pt"
    rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    return state, rng


def read_scaler_state(folder: Path) -> dict[str, Any] | None:
    """The fp16 loss scaler's saved state_dict, or None when the checkpoint has none."""
    path = folder / SCALER_FILE
    return json.loads(path.read_text()) if path.is_file() else None
