"""Sequence-level KD: the teacher completes each prompt."""

from __future__ import annotations

from torch import nn

from kdkit.registry import SAMPLERS
from kdkit.samplers.base import GeneratingSampler


@SAMPLERS.register("teacher", "the teacher's own sampled completions (sequence-level KD)")
class TeacherSampler(GeneratingSampler):
    source = "teacher"

    def model(self, student: nn.Module, teacher: nn.Module | None) -> nn.Module:
        if teacher is None:
            raise ValueError("the teacher sampler needs a teacher model")
        return teacher
