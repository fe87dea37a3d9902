"""Log-probabilities of the batch's own tokens only (one number per token): all a sampled-token
objective needs, and all that many served teachers return."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdkit.losses.tokens import shift, token_log_probs
from kdkit.registry import TEACHER_SIGNALS
from kdkit.signals.base import TeacherSignal, TeacherTarget, model_inputs, require_teacher


@TEACHER_SIGNALS.register(
    "token_logprobs", "log p_T of the sequence's own tokens only (one number per token)"
)
class TokenLogprobsSignal(TeacherSignal):
    """token_logprobs at temperature 1; on batches the teacher sampled at a temperature τ ∉ {0, 1},
    also the behaviour log-probs at τ, so importance weights use the distribution actually sampled."""

    provides = "token_logprobs"

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], *, teacher: nn.Module | None) -> TeacherTarget:
        model = require_teacher(teacher, "token_logprobs")
        logits, targets, _ = shift(model(**model_inputs(batch)).logits, batch["labels"])
        target = TeacherTarget(token_logprobs=token_log_probs(logits, targets))
        tau = float(batch.get("sampling_temperature", 1.0))
        if batch.get("source") == "teacher" and tau not in (0.0, 1.0):
            target.behaviour_logprobs = token_log_probs(logits, targets, temperature=tau)
        return target
