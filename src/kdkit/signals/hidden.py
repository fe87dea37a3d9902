"""White-box, fused: the teacher's final hidden states and LM head, so a fused loss projects them
in token chunks and the [tokens × vocabulary] logits of teacher and student never coexist."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit.models.heads import backbone_and_head
from kdkit.registry import TEACHER_SIGNALS
from kdkit.signals.base import TeacherSignal, TeacherTarget, model_inputs, require_teacher


@TEACHER_SIGNALS.register("hidden", "the teacher's final hidden states + LM head, for fused chunked losses")
class HiddenSignal(TeacherSignal):
    provides = "hidden"

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], *, teacher: nn.Module | None) -> TeacherTarget:
        backbone, head = backbone_and_head(require_teacher(teacher, "hidden"))
        return TeacherTarget(hidden=backbone(**model_inputs(batch)).last_hidden_state, head=head)
