"""Named phases of a training step, for profilers and step timers: `with phase("teacher"): ...`.

Each phase is a `torch.profiler.record_function` range named "kdkit.<phase>", so torch.profiler
(and the Perfetto/Chrome traces it exports) shows where a step's time goes; with no profiler
running a range costs one dispatcher call. Inside `PhaseTimer()` every phase is also timed with
`time.perf_counter` (after a device synchronise where one is needed), which is what
benchmarks/step_profile.py reads: per-op profiling would inflate the many small calls of sampling.

The phases of an LM step: data (the next batch), sample (generation, on-policy batches only),
teacher (the teacher signal), loss (the objective, which runs the student forward pass, timed as
student_forward inside it), backward, optimizer (clipping, the step, the lr schedule, zeroing).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

STEP_PHASES = ("data", "sample", "teacher", "loss", "student_forward", "backward", "optimizer")

_active: PhaseTimer | None = None


@contextmanager
def phase(name: str) -> Iterator[None]:
    """A named range of the step (one of `STEP_PHASES`); timed when a `PhaseTimer` is active."""
    if name not in STEP_PHASES:
        raise ValueError(f"unknown step phase {name!r}; known: {', '.join(STEP_PHASES)}")
    with record_function(f"kdkit.{name}"):
        timer = _active
        if timer is None:
            yield
            return
        timer.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            timer.sync()
            timer.add(name, started, time.perf_counter())


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the work queued on `device` (a CUDA or MPS device; None: whichever is in use), so
    that a wall-clock stamp taken next covers it. A CPU runs every op synchronously: nothing to do."""
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device if kind == "cuda" else None)
    elif kind in (None, "mps") and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.synchronize()


@dataclass
class PhaseTimer:
    """Collect (phase, start, end) wall times of every `phase` entered while active (not nestable).

    synchronize: wait for queued device work at each phase boundary (CUDA/MPS), so a phase is
    charged the kernels it launched; on a CPU every op is already synchronous.
    """

    synchronize: bool = True
    spans: list[tuple[str, float, float]] = field(default_factory=list)

    def sync(self) -> None:
        if self.synchronize:
            synchronize()

    def add(self, name: str, start: float, end: float) -> None:
        self.spans.append((name, start, end))

    def steps(self) -> list[dict[str, float]]:
        """Seconds per phase for each optimizer step (a step ends with its "optimizer" phase),
        plus "step" (from the previous step's end, or the first span's start, to this step's end)."""
        out: list[dict[str, float]] = []
        current: dict[str, float] = {}
        step_start = self.spans[0][1] if self.spans else 0.0
        for name, start, end in self.spans:
            current[name] = current.get(name, 0.0) + end - start
            if name == "optimizer":
                current["step"] = end - step_start
                out.append(current)
                current, step_start = {}, end
        return out

    def __enter__(self) -> PhaseTimer:
        global _active
        if _active is not None:
            raise RuntimeError("a PhaseTimer is already active")
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None


__all__ = ["STEP_PHASES", "PhaseTimer", "phase", "synchronize"]
