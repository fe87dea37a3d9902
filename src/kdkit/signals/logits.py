"""White-box, live: the teacher's full next-token logits for every position a label is predicted from.

Positions before the first one that predicts a trained label (the prompt, in every row) are not
projected to the vocabulary (`TeacherTarget.start`): with long prompts that is most of the head's work.
A frozen Llama-family teacher runs through `LeanDecoder.hidden` (the same function in about half the
tensor ops, see `kdkit.samplers.fast_decode`); other teachers through their own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit.losses.tokens import first_trained_position
from kdkit.models.heads import logits_from
from kdkit.registry import TEACHER_SIGNALS
from kdkit.samplers.fast_decode import frozen_teacher_decoder
from kdkit.signals.base import TeacherSignal, TeacherTarget, model_inputs, require_teacher


@TEACHER_SIGNALS.register("logits", "the teacher's full next-token logits, live (white-box)")
class LogitsSignal(TeacherSignal):
    provides = "logits"

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], *, teacher: nn.Module | None) -> TeacherTarget:
        model = require_teacher(teacher, "logits")
        start = first_trained_position(batch["labels"]) if "labels" in batch else 0
        inputs = model_inputs(batch)
        lean = frozen_teacher_decoder(model, inputs["input_ids"].device.type)
        if lean is not None:
            hidden = lean.hidden(inputs["input_ids"], inputs.get("attention_mask"), start)
            return TeacherTarget(logits=lean.logits(hidden), start=start)
        return TeacherTarget(logits=logits_from(model, inputs, start), start=start)
