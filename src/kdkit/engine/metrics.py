"""Training history: averaged loss terms per logging window, to metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DIAGNOSTIC_PREFIX = "_"


def is_diagnostic(name: str) -> bool:
    """Terms starting with "_" are reported, never optimised."""
    return name.startswith(DIAGNOSTIC_PREFIX)


def log_name(name: str) -> str:
    """The history key of a term: diagnostics "_gen_s" -> "diag/gen_s", loss terms unchanged."""
    return f"diag/{name[len(DIAGNOSTIC_PREFIX):]}" if is_diagnostic(name) else name


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the loss terms, diagnostics excluded: what gets backpropagated."""
    terms = [value for name, value in losses.items() if not is_diagnostic(name)]
    if not terms:
        raise ValueError(f"the distiller returned no loss term (only diagnostics: {sorted(losses)})")
    for name, value in losses.items():
        if value.ndim != 0:
            shape = tuple(value.shape)
            raise ValueError(f"loss term {name!r} has shape {shape}; the distiller must return scalars")
    return sum(terms[1:], terms[0])


@dataclass
class LossWindow:
    """Running sums of each term over the micro-batches since the last log line (one process).

    Each micro-batch's loss terms (and "loss") count with a weight: 1, or its token count when the
    distiller reports `_tokens`, so a window's mean is then a mean over tokens, like the gradient.
    Diagnostics always count once per micro-batch.
    """

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    examples: int = 0

    def add(
        self, losses: dict[str, torch.Tensor], total: torch.Tensor, examples: int, weight: float | None = None
    ) -> dict[str, float]:
        """Record one micro-batch (loss terms weighted by `weight`, default 1); returns its values
        (for the progress bar)."""
        values = {"loss": float(total.detach())}
        values.update({log_name(k): float(v.detach()) for k, v in losses.items()})
        loss_keys = {"loss", *(k for k in losses if not is_diagnostic(k))}
        for key, value in values.items():
            w = 1.0 if weight is None or key not in loss_keys else weight
            # a micro-batch without tokens adds nothing (its means over no tokens are meaningless)
            self.sums[key] = self.sums.get(key, 0.0) + (value * w if w else 0.0)
            self.counts[key] = self.counts.get(key, 0.0) + w
        self.examples += examples
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossWindow:
        counts = {k: float(v) for k, v in data["counts"].items()}
        return cls(dict(data["sums"]), counts, int(data["examples"]))


def merge_windows(windows: list[dict[str, Any]]) -> tuple[dict[str, float], int]:
    """Weighted mean of each term over every micro-batch of every process; total examples seen.
    A term with zero total weight (no token in the whole window) is NaN."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    examples = 0
    for window in windows:
        for key, value in window["sums"].items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0.0) + window["counts"][key]
        examples += window["examples"]
    means = {key: sums[key] / counts[key] if counts[key] else float("nan") for key in sums}
    # "loss" first, then the terms in the order the distiller returned them
    ordered = {"loss": means.pop("loss")} if "loss" in means else {}
    ordered.update(means)
    return ordered, examples


def truncate_history(path: Path, last_step: int) -> None:
    """Drop history lines after `last_step` (a resumed run re-logs them); atomic rewrite."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    temp = path.with_suffix(".jsonl.tmp")
    temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temp, path)


class MetricsWriter:
    """Appends one JSON line per record to metrics.jsonl (flushed at once) and mirrors it to
    TensorBoard under run_dir/tb when tensorboard is installed. Disabled on non-main processes."""

    def __init__(self, run_dir: Path, *, enabled: bool, purge_after: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        # purge_step drops events a killed run logged after its last checkpoint
        purge = purge_after + 1 if purge_after is not None else None
        self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
