"""Policy-gradient losses for RL-based distillation: GRPO / PPO clipping, REINFORCE, advantages.

Pure functions on tensors (torch only). Conventions shared with the token divergences:

- Per-token inputs are aligned with the *shifted* labels: position t holds the log-probability of
  the token generated at step t, `log_probs[b, t] = log π(y_t | x, y_<t)`, shape [B, T]; `mask`
  [B, T] bool is True on generated tokens (completion tokens, EOS included) and False on prompt and
  padding positions.
- Loss values are means over the generated tokens actually trained on ("token" normalisation, the
  whole batch's count), unless the sequence-mean normalisation of the original GRPO paper is asked
  for. A batch with no generated token gives 0 with zero gradients, not NaN.
- Rewards for group methods are laid out prompt-major: rows i·G .. i·G+G−1 are the G samples of
  prompt i.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMALISATIONS = ("token", "sequence")


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4, unbiased: bool = True
) -> Tensor:
    """Group-normalised advantages (GRPO): A_i = (r_i − mean_group) / (std_group + eps).

    rewards: [N] with N = prompts × group_size, prompt-major (see module docstring).
    scale=False gives the mean-only form A_i = r_i − mean_group (Dr. GRPO, no division by the std,
    which otherwise up-weights groups whose rewards barely differ).
    unbiased: the std uses N−1 in the denominator (as TRL's GRPOTrainer does); False uses N.
    A group whose rewards are all equal gets advantages exactly 0 (it carries no signal).
    Returns [N] float, each group summing to 0 (up to rounding). Detached from `rewards`.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [prompts × group_size], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size} (one group per prompt)"
        )
    if scale and group_size == 1:
        raise ValueError("group_size=1 has no within-group spread to normalise by; use group_size >= 2")
    grouped = rewards.detach().float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True, unbiased=unbiased)
        # a group with no spread has centred rewards 0: keep them exactly 0 (eps=0 would give 0/0)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def masked_mean(values: Tensor, mask: Tensor, normalisation: str = "token") -> Tensor:
    """Mean of `values` [B, T] over True positions of `mask` [B, T].

    "token": Σ values·mask / Σ mask (every generated token of the batch weighs alike).
    "sequence": each row's mean over its own tokens, then the mean over rows with ≥ 1 token
    (the original GRPO form: a short answer's tokens weigh more than a long one's).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    mask = mask.to(values.dtype)
    values = torch.where(mask.bool(), values, values.new_zeros(()))
    if normalisation == "token":
        return values.sum() / mask.sum().clamp_min(1.0)
    per_row_count = mask.sum(1)
    per_row = values.sum(1) / per_row_count.clamp_min(1.0)
    has_tokens = (per_row_count > 0).to(values.dtype)
    return (per_row * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) on tokens sampled from π (Schulman's estimator).

    k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1 ≥ 0, unbiased for the KL and low-variance.
    log_probs (with grad), ref_log_probs: [B, T] -> [B, T]. The difference is clamped to ±20 so
    a token the reference finds impossible gives a large finite value, not inf.
    """
    delta = (ref_log_probs.detach() - log_probs).clamp(-20.0, 20.0)
    return delta.exp() - delta - 1.0


def clipped_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_log_probs: Tensor | None = None,
    kl_coef: float = 0.0,
    normalisation: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy-gradient objective of PPO / GRPO, as a loss to minimise.

    log_probs: [B, T] log π_θ(y_t) under the current policy (with grad).
    old_log_probs: [B, T] log π_old(y_t) under the policy that sampled y (the behaviour policy;
        detached). For a single update per batch of fresh samples it equals `log_probs.detach()`:
        the ratio is 1 and the loss reduces to −A·log π (REINFORCE with the advantage).
    advantages: [B] (one per sequence, e.g. `group_advantages`) or [B, T] per token; detached.
    mask: [B, T] bool, True on generated tokens.
    Per token, ρ = exp(log π_θ − log π_old):
        objective_t = min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A)       (ε_high defaults to ε)
        loss_t      = −objective_t + kl_coef · k3(π_θ ‖ π_ref)     (`k3_kl`, if a reference is given)
    Returns (loss: scalar mean over tokens per `normalisation`, info: detached scalars "ratio",
    "clip_fraction" (share of tokens where the clip is active, i.e. the gradient is cut), "kl"
    (mean k3, 0 without a reference), "policy" (the mean −objective)).
    """
    if log_probs.shape != old_log_probs.shape or log_probs.shape != mask.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)} and mask "
            f"{tuple(mask.shape)} must have one shape [B, T]"
        )
    if clip_eps < 0 or (clip_eps_high is not None and clip_eps_high < 0):
        raise ValueError(f"clip ranges must be >= 0, got {clip_eps}, {clip_eps_high}")
    if kl_coef and ref_log_probs is None:
        raise ValueError("kl_coef > 0 needs ref_log_probs (the reference policy's log-probs)")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages.detach().to(log_probs.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(log_probs)
    elif advantages.shape != log_probs.shape:
        raise ValueError(f"advantages must be [B] or [B, T], got {tuple(advantages.shape)}")
    log_ratio = (log_probs - old_log_probs.detach().to(log_probs.dtype)).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * advantages
    objective = torch.minimum(unclipped, clipped)
    per_token = -objective
    kl = torch.zeros_like(per_token)
    if ref_log_probs is not None:
        kl = k3_kl(log_probs, ref_log_probs.to(log_probs.dtype))
        if kl_coef:
            per_token = per_token + kl_coef * kl
    loss = masked_mean(per_token, mask, normalisation)
    with torch.no_grad():
        is_clipped = (clipped < unclipped).to(log_probs.dtype)  # min picked the clipped branch
        info = {
            "ratio": masked_mean(ratio.detach(), mask),
            "clip_fraction": masked_mean(is_clipped, mask),
            "kl": masked_mean(kl.detach(), mask),
            "policy": masked_mean(-objective.detach(), mask, normalisation),
        }
    return loss, info


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """R_t = Σ_{k≥t} γ^{k−t} r_k over the True positions of each row: [B, T] -> [B, T].

    Masked positions contribute 0 and get 0. γ = 0 returns the rewards themselves (masked).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    rewards = torch.where(mask.bool(), rewards, rewards.new_zeros(()))
    if gamma == 0.0:
        return rewards
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return torch.where(mask.bool(), out, out.new_zeros(()))


def reinforce_loss(
    log_probs: Tensor,
    token_rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    baseline: str = "mean",
    normalisation: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE with a per-token reward, e.g. r_t = log p_T(y_t) (the teacher's log-likelihood).

    log_probs: [B, T] log π_θ(y_t) of the sampled tokens (with grad); token_rewards: [B, T]
    (detached); mask: [B, T] bool, True on generated tokens.
    Each token's weight is its discounted return-to-go R_t = Σ_{k≥t} γ^{k−t} r_k (γ=1: the sum of
    the remaining rewards; γ=0: the token's own reward), minus a baseline:
    "mean" subtracts the mean of R over the batch's generated tokens (variance reduction, no bias
    in expectation), "none" keeps R. loss = −mean_t[(R_t − b)·log π_θ(y_t)].
    Returns (loss scalar, info: detached "return" (mean R_t) and "reward" (mean r_t)).
    """
    if baseline not in ("mean", "none"):
        raise ValueError(f"baseline must be 'mean' or 'none', got {baseline!r}")
    token_rewards = token_rewards.detach().to(log_probs.dtype)
    returns = returns_to_go(token_rewards, mask, gamma)
    mean_return = masked_mean(returns, mask)
    weight = returns - mean_return if baseline == "mean" else returns
    loss = masked_mean(-weight * log_probs, mask, normalisation)
    info = {"return": mean_return.detach(), "reward": masked_mean(token_rewards, mask).detach()}
    return loss, info


__all__ = [
    "NORMALISATIONS",
    "clipped_policy_loss",
    "group_advantages",
    "k3_kl",
    "masked_mean",
    "reinforce_loss",
    "returns_to_go",
]
