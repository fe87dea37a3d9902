"""On-policy: the current student samples each completion (removes exposure bias)."""

from __future__ import annotations

from torch import nn

from kdkit.registry import SAMPLERS
from kdkit.samplers.base import GeneratingSampler


@SAMPLERS.register("student", "the current student's own samples (on-policy, no exposure bias)")
class StudentSampler(GeneratingSampler):
    """KV cache, no grad, eval mode while sampling; the student's own generation config is ignored."""

    source = "student"

    def model(self, student: nn.Module, teacher: nn.Module | None) -> nn.Module:
        return student
