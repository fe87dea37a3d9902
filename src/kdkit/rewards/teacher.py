"""The teacher's log-likelihood of the sampled tokens as a reward (REINFORCE baseline of on-policy KD)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.registry import REWARDS, Param
from kdkit.rewards.base import RewardInputs


@torch.no_grad()
def teacher_token_log_probs(inputs: RewardInputs) -> Tensor:
    """log p_T(y_t | x, y_<t) of every completion token: [B, T-1], aligned with labels[:, 1:].

    Positions that are not completion tokens hold 0. Needs `inputs.teacher` and the token batch.
    """
    if inputs.teacher is None:
        raise ValueError("the teacher log-likelihood reward needs a teacher model")
    batch = inputs.batch
    logits = inputs.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


@REWARDS.register(
    "teacher_loglik",
    "the teacher's log-likelihood of the sample (mean per token); per-token log p_T for REINFORCE",
    params={"mean": Param("average over the completion's tokens (else their sum)")},
)
class TeacherLogLikelihoodReward:
    """Reward = Σ_t log p_T(y_t) over the completion (or the mean per token with `mean=True`).

    `token_rewards(inputs)` gives the per-token form [B, T-1] for REINFORCE.
    """

    needs_teacher = True

    def __init__(self, mean: bool = True) -> None:
        self.mean = mean

    def token_rewards(self, inputs: RewardInputs) -> Tensor:
        return teacher_token_log_probs(inputs)

    def __call__(self, inputs: RewardInputs) -> Tensor:
        per_token = teacher_token_log_probs(inputs)
        total = per_token.sum(1)
        if self.mean:
            count = (inputs.batch["labels"][:, 1:] != -100).sum(1).clamp_min(1)
            total = total / count
        return total.float().cpu()


__all__ = ["TeacherLogLikelihoodReward", "teacher_token_log_probs"]
