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


#: A window sum: a float, or a 0-dim tensor on the accelerator until the window is read.
Number = float | torch.Tensor


def _host_or_device(value: Number) -> Number:
    """A CPU tensor's value as a float (free: nothing to wait for); other devices' tensors as they are."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return float(value) if value.device.type == "cpu" else value
    return float(value)


def _weighted(value: Number, weight: Number) -> Number:
    """value × weight, or 0 when weight is 0 (a mean over no tokens is meaningless, even NaN)."""
    if not isinstance(value, torch.Tensor) and not isinstance(weight, torch.Tensor):
        return value * weight if weight else 0.0
    product = value * weight
    if not isinstance(weight, torch.Tensor):
        return product if weight else torch.zeros_like(product)
    return torch.where(weight != 0, product, torch.zeros_like(product))


def _floats(values: dict[Any, Number]) -> dict[Any, float]:
    """Every value as a float: the device tensors copied to the host together (one wait for the GPU)."""
    out = {key: value for key, value in values.items() if not isinstance(value, torch.Tensor)}
    tensors = {key: value for key, value in values.items() if isinstance(value, torch.Tensor)}
    by_device: dict[torch.device, list[Any]] = {}
    for key, value in tensors.items():
        by_device.setdefault(value.device, []).append(key)
    for keys in by_device.values():
        host = torch.stack([tensors[key].float().reshape(()) for key in keys]).cpu().tolist()
        out.update(zip(keys, host))
    return {key: float(out[key]) for key in values}


@dataclass
class LossWindow:
    """Running sums of each term over the micro-batches since the last log line (one process).

    Each micro-batch's loss terms (and "loss") count with a weight: 1, or its token count when the
    distiller reports `_tokens`, so a window's mean is then a mean over tokens, like the gradient.
    Diagnostics always count once per micro-batch.

    Values on a GPU are summed there (0-dim tensors) and copied to the host only when the window
    is read (`to_dict`, at a log line or checkpoint), so recording a micro-batch never makes the
    training loop wait for the GPU; CPU values are summed as floats.
    """

    sums: dict[str, Number] = field(default_factory=dict)
    counts: dict[str, Number] = field(default_factory=dict)
    examples: int = 0

    def add(
        self,
        losses: dict[str, torch.Tensor],
        total: torch.Tensor,
        examples: int,
        weight: Number | None = None,
    ) -> dict[str, Number]:
        """Record one micro-batch (loss terms weighted by `weight`, default 1); returns its values
        (floats, or device tensors: `float()` them only when they must be shown)."""
        values = {"loss": _host_or_device(total)}
        values.update({log_name(k): _host_or_device(v) for k, v in losses.items()})
        loss_keys = {"loss", *(k for k in losses if not is_diagnostic(k))}
        token_weight = None if weight is None else _host_or_device(weight)
        for key, value in values.items():
            w = 1.0 if token_weight is None or key not in loss_keys else token_weight
            self.sums[key] = self.sums.get(key, 0.0) + _weighted(value, w)
            self.counts[key] = self.counts.get(key, 0.0) + w
        self.examples += examples
        return values

    def to_dict(self) -> dict[str, Any]:
        """The window as plain numbers (waits for the GPU once, when values are still there)."""
        both = _floats({("sums", k): v for k, v in self.sums.items()}
                       | {("counts", k): v for k, v in self.counts.items()})
        return {
            "sums": {k: both[("sums", k)] for k in self.sums},
            "counts": {k: both[("counts", k)] for k in self.counts},
            "examples": self.examples,
        }

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
