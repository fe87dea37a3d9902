"""GKD's λ-mixture: per batch, with probability λ the student's samples, else another source."""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field
from torch import nn

from kdkit.registry import SAMPLERS
from kdkit.samplers.base import Batch, GenerationParams, LMContext
from kdkit.samplers.dataset import DatasetSampler
from kdkit.samplers.student import StudentSampler
from kdkit.samplers.teacher import TeacherSampler


class MixtureParams(GenerationParams):
    lmbda: float = Field(0.5, ge=0.0, le=1.0, description="probability that a batch is the student's samples")


@SAMPLERS.register("mixture", "GKD: per batch, λ the student's samples, else the dataset's")
class MixtureSampler:
    """Per batch, with probability `lmbda` use `on_policy`, else `off_policy`.

    seed=None (the default) draws from Python's global `random`, which the engine seeds from
    `TrainConfig.seed` and saves/restores in its checkpoints, so a run and its resumed twin draw the
    same sources. An explicit seed uses a private `random.Random(seed)`. λ=0 is pure off-policy,
    λ=1 pure student samples.
    """

    Params = MixtureParams
    generates = True

    def __init__(
        self,
        params: MixtureParams | float | None = None,
        ctx: LMContext | None = None,
        *,
        on_policy: Any | None = None,
        off_policy: Any | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(params, (int, float)):
            params = MixtureParams(lmbda=params)
        self.params = params or MixtureParams()
        ctx = ctx or LMContext()
        generation = GenerationParams(**self.params.model_dump(include=set(GenerationParams.model_fields)))
        self.lmbda = self.params.lmbda
        self.on_policy = on_policy or StudentSampler(generation, ctx)
        self.off_policy = off_policy or self.off_policy_sampler(generation, ctx)
        seed = ctx.seed if seed is None else seed
        self.rng: Any = random.Random(seed) if seed is not None else random

    def off_policy_sampler(self, generation: GenerationParams, ctx: LMContext) -> Any:
        return DatasetSampler()

    def __call__(self, batch: Batch, *, student: nn.Module, teacher: nn.Module | None) -> Batch:
        # Draw even when λ is 0 or 1 so the RNG stream does not depend on λ's edge values.
        choose_on_policy = self.rng.random() < self.lmbda
        chosen = self.on_policy if choose_on_policy else self.off_policy
        return chosen(batch, student=student, teacher=teacher)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])


@SAMPLERS.register("student_teacher", "MiniLLM's mix: per batch, λ the student's samples, else the teacher's")
class StudentTeacherSampler(MixtureSampler):
    def off_policy_sampler(self, generation: GenerationParams, ctx: LMContext) -> Any:
        return TeacherSampler(generation, ctx)
