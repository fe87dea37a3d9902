"""White-box, live: the teacher's full next-token logits for every position."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit.registry import TEACHER_SIGNALS
from kdkit.signals.base import TeacherSignal, TeacherTarget, model_inputs, require_teacher


@TEACHER_SIGNALS.register("logits", "the teacher's full next-token logits, live (white-box)")
class LogitsSignal(TeacherSignal):
    provides = "logits"

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], *, teacher: nn.Module | None) -> TeacherTarget:
        model = require_teacher(teacher, "logits")
        return TeacherTarget(logits=model(**model_inputs(batch)).logits)
