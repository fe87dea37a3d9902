"""Schedules of a method's scalar knobs over training (GKD's λ or β, a KL coefficient, ...).

`ParamSchedule` maps an optimizer step to a value. A distiller reads the step the engine announces
through `Distiller.on_step` (`global_step`), so schedules count optimizer steps, not forward calls,
and continue exactly after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class ParamSchedule:
    """A scalar that moves from `start` to `end` over optimizer steps [warmup, warmup + steps].

    kind: "constant" (always `start`), "linear", "cosine" (half-cosine from start to end), or
    "step" (`start` before warmup + steps, `end` from then on).
    Before `warmup` the value is `start`; after warmup + steps it is `end`.
    Example: GKD's λ from 0 (dataset only) to 1 (student samples only) over the first half of a
    1000-step run: ParamSchedule(0.0, 1.0, kind="linear", steps=500).
    """

    start: float
    end: float | None = None
    kind: str = "linear"
    steps: int = 1
    warmup: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"a schedule needs steps >= 1 and warmup >= 0, got {self.steps}, {self.warmup}")

    def __call__(self, step: int) -> float:
        end = self.start if self.end is None else self.end
        if self.kind == "constant":
            return float(self.start)
        progress = min(max((step - self.warmup) / self.steps, 0.0), 1.0)
        if self.kind == "step":
            return float(end if progress >= 1.0 else self.start)
        if self.kind == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return float(self.start + (end - self.start) * progress)


__all__ = ["SCHEDULE_KINDS", "ParamSchedule"]
