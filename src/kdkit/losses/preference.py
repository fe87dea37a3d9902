"""Preference losses on sequence log-probabilities: DPO (used by SODA-style black-box distillation)."""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class DPOOutput(NamedTuple):
    """loss: scalar. chosen_rewards, rejected_rewards, margins: [B], detached (for logging)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Direct Preference Optimization (Rafailov et al., 2023).

    All inputs: [B] summed log-probabilities (nats) of each whole response under the policy (student)
    or the frozen reference model. Implicit reward r = β·(log π − log π_ref); the loss is
    mean_b −log σ(r_chosen − r_rejected). With label_smoothing ε > 0 it is the conservative DPO of
    Mitchell (2023): −(1−ε)·log σ(m) − ε·log σ(−m), for noisy preference labels.
    Returns DPOOutput(loss, chosen_rewards, rejected_rewards, margins = chosen − rejected).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    margin = chosen - rejected
    # logsigmoid, not log(sigmoid): stays finite for margins of any size
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return DPOOutput(losses.mean(), chosen.detach(), rejected.detach(), margin.detach())


__all__ = ["DPOOutput", "dpo_loss"]
