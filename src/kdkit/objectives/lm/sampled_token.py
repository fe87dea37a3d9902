"""On-policy distillation from the teacher's log-probs of the sampled tokens only (advantage PG)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor

from kdkit.losses.tokens import shared_vocab, shift, token_log_probs
from kdkit.objectives.lm.base import LMObjective, StudentView
from kdkit.registry import LM_OBJECTIVES
from kdkit.settings import ParamsModel
from kdkit.signals.base import TeacherTarget


class SampledTokenParams(ParamsModel):
    """advantage_coef c: A_t = −c·(log p_S − log p_T); gamma: discount of future terms (0 = per
    token, 1 = MiniLLM's reward-to-go); is_clip: upper clip of per-token importance ratios."""

    advantage_coef: PositiveFloat = 1.0
    gamma: float = Field(0.0, ge=0.0, le=1.0)
    is_clip: PositiveFloat = 5.0


def discounted_returns(values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R_t = Σ_{k≥t} γ^{k−t} values_k over counted positions of each row: [B, T] -> [B, T].

    Masked positions contribute 0 and get 0; γ=0 returns `values` (masked) unchanged.
    """
    values = values * mask
    if gamma == 0.0:
        return values
    out = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def sampled_token_loss(
    student_logits: Tensor,
    teacher_token_log_probs: Tensor,
    labels: Tensor,
    *,
    coef: float = 1.0,
    gamma: float = 0.0,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """On-policy distillation from the teacher's log-probs of the sampled tokens only.

    student_logits: [B, T, V] (with grad), labels: [B, T] (the sampled completion, -100 elsewhere),
    teacher_token_log_probs: [B, T-1] = log p_T(y_{t+1} | y_≤t), aligned with the shifted labels.
    Per token: A_t = −coef·(log p_S(y_t) − log p_T(y_t)), detached; with γ>0 A_t is replaced by the
    discounted sum of future terms. loss = −mean_t [w_t · A_t · log p_S(y_t)] over completion
    tokens, with importance weights w_t (detached) where the samples did not come from p_S itself.
    Returns (loss scalar, diagnostics: "log_ratio" = mean(log p_S − log p_T) over sampled tokens).
    """
    logits, targets, mask = shift(student_logits, labels)
    log_p_s = token_log_probs(logits, targets)
    log_ratio = (log_p_s - teacher_token_log_probs.to(log_p_s.dtype)).detach()
    advantage = discounted_returns(-coef * log_ratio, mask, gamma)
    count = mask.sum().clamp(min=1)
    if importance_weights is not None:
        advantage = advantage * importance_weights.detach()
    loss = -(advantage * log_p_s * mask).sum() / count
    diagnostics = {
        "log_ratio": (log_ratio * mask).sum() / count,
        "advantage": (advantage * mask).sum() / count,
    }
    return loss, diagnostics


@LM_OBJECTIVES.register(
    "sampled_token",
    "advantage policy gradient from log p_T of the sampled tokens only (one number per token)",
)
class SampledTokenObjective(LMObjective):
    """Importance weights, clipped at `is_clip`, correct for samples not drawn from p_S at
    temperature 1: the teacher's samples (behaviour = teacher at the sampling temperature τ) and the
    student's own samples at τ ≠ 1 (behaviour = the student at τ). Greedy samples (τ = 0) have no
    density to correct with and are used unweighted; dataset batches likewise."""

    Params = SampledTokenParams
    accepts = ("token_logprobs", "logits")

    def __call__(
        self, student: StudentView, batch: dict[str, Any], target: TeacherTarget, *, ce_ratio: float = 0.0
    ) -> dict[str, Tensor]:
        self.check_target(target)
        labels = batch["labels"]
        logits = student.logits
        teacher_lp, behaviour = target.token_logprobs, target.behaviour_logprobs
        tau = float(batch.get("sampling_temperature", 1.0))
        source = batch.get("source", "dataset")
        _, targets, _ = shift(logits, labels)
        if teacher_lp is None:
            assert target.logits is not None
            # the teacher's logits start at target.start: its positions before predict no label
            s_logits, t_logits = shared_vocab(logits[:, target.start :], target.logits)
            window = targets[:, target.start :]
            teacher_lp = F.pad(token_log_probs(t_logits[:, :-1], window), (target.start, 0))
            if source == "teacher" and tau not in (0.0, 1.0):
                lp = token_log_probs(t_logits[:, :-1], window, temperature=tau)
                behaviour = F.pad(lp, (target.start, 0))
        weights = None
        with torch.no_grad():
            if source == "teacher" and tau != 0.0:
                behaviour = teacher_lp if behaviour is None else behaviour
            elif source == "student" and tau not in (0.0, 1.0):
                behaviour = token_log_probs(logits[:, :-1].detach(), targets, temperature=tau)
            else:
                behaviour = None
            if behaviour is not None:
                student_lp = token_log_probs(logits[:, :-1].detach(), targets)
                weights = (student_lp - behaviour).exp().clamp(max=self.params.is_clip)
        p = self.params
        loss, diagnostics = sampled_token_loss(
            logits, teacher_lp, labels, coef=p.advantage_coef, gamma=p.gamma, importance_weights=weights
        )
        return {"kd": loss, "log_ratio": diagnostics["log_ratio"]}
