"""GKD with its λ (share of on-policy batches) and β (JSD weight) scheduled over training.

`ScheduledLMDistiller` is an `LMDistiller` whose mixture sampler's λ and whose divergence's
parameters (β, or e.g. AKL's μ) are set, before every forward, from `ParamSchedule`s read at the
optimizer step the engine announces through `on_step` (`global_step`; exact after a resume, as the
engine announces the checkpoint's step). The values in use are logged as diagnostics ("_lmbda",
"_beta", ...). The registered method `gkd_scheduled` moves λ and β linearly (or by a cosine or a
step) from GKD's values to `lmbda_end` / `beta_end` over `schedule_steps` steps.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from torch import Tensor, nn

from kdkit.engine.param_schedule import ParamSchedule
from kdkit.methods.base import LMParts
from kdkit.methods.gkd import GKD, GKDParams
from kdkit.methods.lm_distiller import LMDistiller
from kdkit.registry import METHODS
from kdkit.settings import LMContext


class ScheduledLMDistiller(LMDistiller):
    """LMDistiller + schedules. lmbda: a schedule of the sampler's λ (the sampler must have an
    `lmbda`, e.g. `MixtureSampler`); divergence_schedules: {parameter: schedule} for the
    objective's divergence parameters (e.g. {"beta": ParamSchedule(0.0, 1.0, steps=500)}: forward
    KL early, reverse KL late). Other keywords go to `LMDistiller`."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        lmbda: ParamSchedule | None = None,
        divergence_schedules: dict[str, ParamSchedule] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(student, teacher, **options)
        if lmbda is not None and not hasattr(self.sampler, "lmbda"):
            raise ValueError(f"a λ schedule needs a mixture sampler, got {type(self.sampler).__name__}")
        self.divergence_schedules = dict(divergence_schedules or {})
        if self.divergence_schedules:
            from kdkit.losses import DIVERGENCES

            own = getattr(getattr(self.objective, "params", None), "divergence_params", None)
            if own is None:
                raise ValueError("divergence schedules need a divergence objective")
            name = self.objective.params.divergence
            for key, schedule in self.divergence_schedules.items():  # both ends must be allowed
                end = schedule.start if schedule.end is None else schedule.end
                DIVERGENCES.check_params(name, {key: schedule.start})
                DIVERGENCES.check_params(name, {key: end})
        self.lmbda_schedule = lmbda

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        step = self.global_step or 0
        current: dict[str, float] = {}
        if self.lmbda_schedule is not None:
            self.sampler.lmbda = current["lmbda"] = self.lmbda_schedule(step)
        for key, schedule in self.divergence_schedules.items():
            self.objective.params.divergence_params[key] = current[key] = schedule(step)
        out = super().forward(batch)
        for key, value in current.items():
            out[f"_{key}"] = out["_tokens"].new_tensor(value)
        return out


class ScheduledGKDParams(GKDParams):
    """GKD's parameters (λ and β are the values at the start) plus where they end and how fast.

    lmbda_end / beta_end: the values after `schedule_warmup + schedule_steps` optimizer steps
    (None: constant). schedule: "linear", "cosine" or "step"."""

    lmbda_end: float | None = Field(None, ge=0.0, le=1.0)
    beta_end: float | None = Field(None, ge=0.0, le=1.0)
    schedule: Literal["linear", "cosine", "step"] = "linear"
    schedule_steps: PositiveInt = 1000
    schedule_warmup: NonNegativeInt = 0

    @model_validator(mode="after")
    def _beta_is_a_parameter(self) -> ScheduledGKDParams:
        if self.beta_end is not None and "beta" not in self.divergence_params:
            raise ValueError(f"beta_end needs a divergence with a beta (jsd), got {self.divergence!r}")
        return self


@METHODS.register(
    "gkd_scheduled",
    "GKD with λ and/or β moved over training (e.g. λ 0→1: dataset first, then the student's samples)",
)
class ScheduledGKD(GKD):
    Params = ScheduledGKDParams

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return GKD.parts(params)

    @classmethod
    def build(cls, params: Any, student: Any, teacher: Any, ctx: LMContext, **options: Any) -> Any:
        plain = GKD.build(params, student, teacher, ctx, **options)

        def schedule(start: float, end: float | None) -> ParamSchedule:
            return ParamSchedule(
                start, end, kind=params.schedule, steps=params.schedule_steps, warmup=params.schedule_warmup
            )

        betas = {}
        if params.beta_end is not None:
            betas["beta"] = schedule(params.divergence_params["beta"], params.beta_end)
        return ScheduledLMDistiller(
            student,
            plain.teacher,
            sampler=plain.sampler,
            signal=plain.signal,
            objective=plain.objective,
            kd_weight=plain.kd_weight,
            ce_weight=plain.ce_weight,
            lmbda=None if params.lmbda_end is None else schedule(params.lmbda, params.lmbda_end),
            divergence_schedules=betas,
            **options,
        )


__all__ = ["ScheduledGKD", "ScheduledGKDParams", "ScheduledLMDistiller"]
