"""Policy-gradient losses: group advantages, the clipped GRPO/PPO objective, REINFORCE, AKL, schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kdkit.engine.param_schedule import ParamSchedule
from kdkit.losses import DIVERGENCES
from kdkit.losses.divergences import adaptive_kl, forward_kl, reverse_kl
from kdkit.losses.policy import (
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    masked_mean,
    reinforce_loss,
    returns_to_go,
)

# ----------------------------------------------------------------------------------------------------
# advantages


def test_group_advantages_sum_to_zero_per_group_and_are_standardised() -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 4, generator=gen)
    adv = group_advantages(rewards, 4)
    groups = adv.view(5, 4)
    assert_close(groups.sum(1), torch.zeros(5), atol=1e-5, rtol=0)
    # each group has (unbiased) std ≈ 1 (eps is small against these spreads)
    assert_close(groups.std(1), torch.ones(5), atol=2e-3, rtol=0)
    # the order inside a group is kept: the best sample gets the largest advantage
    assert torch.equal(groups.argmax(1), rewards.view(5, 4).argmax(1))


def test_group_advantages_hand_case_and_mean_only() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0])
    mean_only = group_advantages(rewards, 3, scale=False)
    assert_close(mean_only, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    scaled = group_advantages(rewards, 3, eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased
    assert_close(scaled[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std)
    assert torch.equal(scaled[3:], torch.zeros(3))  # equal rewards: no signal, exactly 0


def test_group_advantages_errors() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size=1"):
        group_advantages(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3)


# ----------------------------------------------------------------------------------------------------
# clipped objective


def test_clipped_objective_gradient_matches_hand_computation() -> None:
    """Four tokens, one per clipping regime, ε = 0.2; token-mean over the 4 generated tokens.

    d loss / d log π_t = −ρ_t·A_t / 4 where the unclipped branch is the minimum, else 0.
    """
    old = torch.zeros(1, 5)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 1.5, 0.7]])  # last position is padding
    advantages = torch.tensor([[2.0, 2.0, 2.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    log_probs = ratios.log().requires_grad_(True)
    loss, info = clipped_policy_loss(log_probs, old, advantages, mask, clip_eps=0.2)
    loss.backward()
    # token 0: ρ=1.1 inside the clip -> -1.1·2/4; token 1: ρ=1.5 > 1.2 with A>0 -> clipped, 0;
    # token 2: ρ=0.5 < 0.8 with A>0 -> min picks ρ·A (unclipped) -> -0.5·2/4;
    # token 3: ρ=1.5 with A<0 -> min picks ρ·A = -1.5 (more negative) -> +1.5/4; token 4 masked
    expected_grad = torch.tensor([[-1.1 * 2 / 4, 0.0, -0.5 * 2 / 4, 1.5 / 4, 0.0]])
    assert_close(log_probs.grad, expected_grad)
    expected_loss = -(1.1 * 2 + 1.2 * 2 + 0.5 * 2 + 1.5 * -1.0) / 4
    assert_close(loss, torch.tensor(expected_loss))
    assert_close(info["clip_fraction"], torch.tensor(0.25))


def test_clipped_objective_asymmetric_clip_and_sequence_normalisation() -> None:
    old = torch.zeros(2, 3)
    log_probs = torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.0, 1.0]]).log().requires_grad_(True)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, 1.0])
    # ε_high = 0.6: ρ = 1.5 is now inside the clip
    loss, _ = clipped_policy_loss(
        log_probs, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6, normalisation="sequence"
    )
    loss.backward()
    # sequence mean: row 0 has one token (weight 1/2), row 1 three tokens (1/6 each)
    expected = torch.tensor([[-1.5 / 2, 0.0, 0.0], [-1 / 6, -1 / 6, -1 / 6]])
    assert_close(log_probs.grad, expected)
    assert_close(loss, torch.tensor(-(1.5 + 1.0) / 2))


def test_on_policy_ratio_one_equals_advantage_weighted_log_likelihood_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    log_probs = (-torch.rand(3, 4, generator=gen)).requires_grad_(True)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    adv = torch.randn(3, generator=gen)
    loss, info = clipped_policy_loss(log_probs, log_probs.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, log_probs)
    expected = -(adv[:, None].expand(3, 4) * mask) / mask.sum()
    assert_close(grad, expected)
    assert_close(info["ratio"], torch.tensor(1.0))
    assert float(info["clip_fraction"]) == 0.0


def test_kl_penalty_is_k3_with_its_gradient() -> None:
    log_probs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    zero_adv = torch.zeros(1)
    loss, info = clipped_policy_loss(
        log_probs, log_probs.detach(), zero_adv, mask, ref_log_probs=ref, kl_coef=0.1
    )
    loss.backward()
    delta = ref - log_probs.detach()
    assert_close(loss, 0.1 * (delta.exp() - delta - 1).mean())
    # d/dlogπ [e^{ref−logπ} − (ref−logπ) − 1] = −e^{ref−logπ} + 1
    assert_close(log_probs.grad, 0.1 * (1 - delta.exp()) / 2)
    assert_close(info["kl"], (delta.exp() - delta - 1).mean())
    assert float(k3_kl(ref, ref).abs().max()) == 0.0  # the same policy: exactly 0
    with pytest.raises(ValueError, match="ref_log_probs"):
        clipped_policy_loss(log_probs, log_probs.detach(), zero_adv, mask, kl_coef=0.1)


def test_empty_mask_gives_zero_not_nan() -> None:
    log_probs = torch.zeros(2, 3, requires_grad=True)
    loss, _ = clipped_policy_loss(log_probs, log_probs.detach(), torch.ones(2), torch.zeros(2, 3, dtype=bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(log_probs.grad, torch.zeros(2, 3))
    assert float(masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=bool), "sequence")) == 0.0


# ----------------------------------------------------------------------------------------------------
# REINFORCE


def test_returns_to_go_hand_case() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert_close(returns_to_go(rewards, mask, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    assert_close(returns_to_go(rewards, mask, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0]]))
    assert_close(returns_to_go(rewards, mask, 0.0), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_reinforce_gradient_with_teacher_log_likelihood_reward() -> None:
    log_probs = torch.tensor([[-0.5, -1.0], [-0.2, -0.1]], requires_grad=True)
    teacher_lp = torch.tensor([[-1.0, -3.0], [-0.5, 0.0]])  # r_t = log p_T(y_t)
    mask = torch.tensor([[True, True], [True, False]])
    loss, info = reinforce_loss(log_probs, teacher_lp, mask, gamma=1.0, baseline="none")
    loss.backward()
    returns = torch.tensor([[-4.0, -3.0], [-0.5, 0.0]])
    assert_close(log_probs.grad, -returns * mask / 3)
    assert_close(info["reward"], torch.tensor(-4.5 / 3))
    log_probs.grad = None
    loss, _ = reinforce_loss(log_probs, teacher_lp, mask, gamma=1.0, baseline="mean")
    loss.backward()
    baseline = (-4.0 - 3.0 - 0.5) / 3
    assert_close(log_probs.grad, -(returns - baseline) * mask / 3)


# ----------------------------------------------------------------------------------------------------
# adaptive KL


def _logits(seed: int, shape: tuple[int, ...] = (4, 6, 11)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_adaptive_kl_reduces_to_forward_and_reverse_kl_at_its_extremes() -> None:
    s, t = _logits(1), _logits(2)
    assert_close(adaptive_kl(s, t, mu=0.0, reduction="none"), forward_kl(s, t, reduction="none"))
    assert_close(adaptive_kl(s, t, mu=1.0, reduction="none"), reverse_kl(s, t, reduction="none"))
    # between the ends: a convex combination of the two, per position
    mid = adaptive_kl(s, t, mu=0.5, reduction="none")
    low = torch.minimum(forward_kl(s, t, reduction="none"), reverse_kl(s, t, reduction="none"))
    high = torch.maximum(forward_kl(s, t, reduction="none"), reverse_kl(s, t, reduction="none"))
    assert bool(((mid >= low - 1e-6) & (mid <= high + 1e-6)).all())
    assert DIVERGENCES.get("akl") is adaptive_kl and DIVERGENCES.get("adaptive_kl") is adaptive_kl


def test_adaptive_kl_hand_computed_weights() -> None:
    p_t = torch.tensor([0.6, 0.3, 0.1])
    p_s = torch.tensor([0.2, 0.5, 0.3])
    # μ = 0.5: sorted ascending 0.1, 0.3, 0.6 -> cumulative 0.1, 0.4, 1.0 -> tail = {0.1, 0.3}
    gap_tail = abs(0.1 - 0.3) + abs(0.3 - 0.5)
    gap_head = abs(0.6 - 0.2)
    w_head = gap_head / (gap_head + gap_tail)
    fkl = float((p_t * (p_t / p_s).log()).sum())
    rkl = float((p_s * (p_s / p_t).log()).sum())
    got = adaptive_kl(p_s.log(), p_t.log(), mu=0.5)
    assert_close(got, torch.tensor(w_head * fkl + (1 - w_head) * rkl))
    # identical distributions: exactly 0, finite gradient
    s = p_t.log().clone().requires_grad_(True)
    value = adaptive_kl(s, p_t.log(), mu=0.5)
    value.backward()
    assert float(value.detach().abs()) < 1e-7 and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="mu"):
        adaptive_kl(s, p_t.log(), mu=1.5)


# ----------------------------------------------------------------------------------------------------
# schedules


def test_param_schedule_kinds() -> None:
    linear = ParamSchedule(0.0, 1.0, kind="linear", steps=10, warmup=5)
    assert [linear(s) for s in (0, 5, 10, 15, 100)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    cosine = ParamSchedule(1.0, 0.0, kind="cosine", steps=10)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-12 and cosine(10) == 0.0
    assert ParamSchedule(0.3, 0.9, kind="step", steps=4)(3) == 0.3
    assert ParamSchedule(0.3, 0.9, kind="step", steps=4)(4) == 0.9
    assert ParamSchedule(0.3, kind="constant")(1000) == 0.3
    with pytest.raises(ValueError, match="kind"):
        ParamSchedule(0.0, 1.0, kind="exp")
