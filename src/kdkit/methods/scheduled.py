"""GKD with its λ (share of on-policy batches) and β (JSD weight) scheduled over training.

`ScheduledLMDistiller` is an `LMDistiller` whose mixture sampler's λ and whose divergence's β (or
any other divergence keyword, e.g. AKL's mu) are set, before every training forward, from
`ParamSchedule`s read at the current optimizer step (`StepCounter`, saved with the weights, so a
resumed run continues the schedule where it stopped). The values in use are logged as diagnostics
("_lmbda", "_beta", ...).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdkit.engine.param_schedule import ParamSchedule, StepCounter
from kdkit.methods.lm import LMDistiller
from kdkit.samplers import MixtureSampler


class ScheduledLMDistiller(LMDistiller):
    """LMDistiller + schedules. lmbda: a schedule of the mixture sampler's λ (needs a
    `MixtureSampler`); divergence_schedules: {keyword: schedule} for the divergence's keywords
    (e.g. {"beta": ParamSchedule(0.0, 1.0, steps=500)}: forward KL early, reverse KL late).
    grad_accum_steps: micro-batches per optimizer step (as in the run's TrainConfig)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        lmbda: ParamSchedule | None = None,
        divergence_schedules: dict[str, ParamSchedule] | None = None,
        grad_accum_steps: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(student, teacher, **options)
        if lmbda is not None and not isinstance(self.sampler, MixtureSampler):
            raise ValueError("a λ schedule needs a MixtureSampler (sampler='mixture')")
        self.lmbda_schedule = lmbda
        self.divergence_schedules = dict(divergence_schedules or {})
        self.counter = StepCounter(grad_accum_steps)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        step = self.counter.tick()
        current: dict[str, float] = {}
        if self.lmbda_schedule is not None:
            self.sampler.lmbda = current["lmbda"] = self.lmbda_schedule(step)
        for key, schedule in self.divergence_schedules.items():
            self.divergence_kwargs[key] = current[key] = schedule(step)
        out = super().forward(batch)
        device = out["_tokens"].device
        for key, value in current.items():
            out[f"_{key}"] = out["_tokens"].new_tensor(value).to(device)
        return out


__all__ = ["ScheduledLMDistiller"]
