"""Schedules of a method's scalar knobs over training (GKD's λ or β, a KL coefficient, ...).

`ParamSchedule` maps an optimizer step to a value; `StepCounter` is the small module a method
holds to know the current optimizer step from inside its `forward` (the engine does not pass it):
it counts training micro-batches in a persistent buffer, so the count is saved with the distiller's
weights in every checkpoint and restored on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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


class StepCounter(nn.Module):
    """The optimizer step a method's forward is part of: micro-batches seen // grad_accum_steps.

    Call `tick()` once per training forward (it counts only while the module is in training mode,
    so evaluation forwards never advance it). The count is a persistent buffer: it travels with
    the distiller's state dict into checkpoints and back on resume.
    """

    def __init__(self, grad_accum_steps: int = 1) -> None:
        super().__init__()
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.grad_accum_steps = grad_accum_steps
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.long))

    @property
    def step(self) -> int:
        """The optimizer step the current forward belongs to (0 for the first step)."""
        return int(self.micro_batches) // self.grad_accum_steps

    def tick(self) -> int:
        """The current step; then advance by one micro-batch (training mode only)."""
        step = self.step
        if self.training:
            self.micro_batches += 1
        return step


__all__ = ["SCHEDULE_KINDS", "ParamSchedule", "StepCounter"]
