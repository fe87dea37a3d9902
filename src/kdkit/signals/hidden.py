"""White-box, fused: the teacher's final hidden states and LM head, so a fused loss projects them
in token chunks and the [tokens × vocabulary] logits of teacher and student never coexist."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit.models.heads import backbone_and_head
from kdkit.registry import TEACHER_SIGNALS
from kdkit.samplers.fast_decode import frozen_teacher_decoder
from kdkit.signals.base import TeacherSignal, TeacherTarget, model_inputs, require_teacher


@TEACHER_SIGNALS.register("hidden", "the teacher's final hidden states + LM head, for fused chunked losses")
class HiddenSignal(TeacherSignal):
    provides = "hidden"

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], *, teacher: nn.Module | None) -> TeacherTarget:
        model = require_teacher(teacher, "hidden")
        backbone, head = backbone_and_head(model)
        inputs = model_inputs(batch)
        lean = frozen_teacher_decoder(model, inputs["input_ids"].device.type)  # see signals/logits.py
        if lean is not None:
            hidden = lean.hidden(inputs["input_ids"], inputs.get("attention_mask"))
            return TeacherTarget(hidden=hidden, head=head)
        return TeacherTarget(hidden=backbone(**inputs).last_hidden_state, head=head)
