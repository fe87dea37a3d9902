"""KD, DKD and DIST against direct reference implementations and known identities (+ DPO)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkit.losses import dist_loss, dkd_loss, dkd_parts, dpo_loss, kd_loss

FAST = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(seed: int, b: int, c: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, c, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, c, (b,), generator=g)
    return s, t, labels


# --------------------------------------------------------------------------------------------------
# KD


def test_kd_matches_hinton_reference():
    s, t, _ = _logits(0, 8, 10)
    T = 4.0
    reference = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T**2
    torch.testing.assert_close(kd_loss(s, t, temperature=T), reference)
    torch.testing.assert_close(kd_loss(s, t, temperature=T, t2_scaling=False), reference / T**2)
    assert kd_loss(s, s.clone()).item() == 0.0


def test_kd_reductions():
    s, t, _ = _logits(1, 6, 5)
    per_example = kd_loss(s, t, reduction="none")
    assert per_example.shape == (6,)
    torch.testing.assert_close(kd_loss(s, t, reduction="sum"), per_example.sum())
    torch.testing.assert_close(kd_loss(s, t), per_example.mean())


# --------------------------------------------------------------------------------------------------
# DKD


def dkd_reference(s, t, labels, alpha, beta, T):
    """mdistiller's formulation, written out directly (target removed by a −1000 offset there)."""
    gt = F.one_hot(labels, s.shape[1]).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T**2
    log_ps2 = F.log_softmax(s / T - 1000.0 * gt, 1)
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    nckd = F.kl_div(log_ps2, pt2, reduction="batchmean") * T**2
    return alpha * tckd + beta * nckd


@FAST
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 6),
    c=st.integers(3, 12),
    alpha=st.sampled_from([0.5, 1.0]),
    beta=st.sampled_from([1.0, 8.0]),
    T=st.sampled_from([1.0, 4.0]),
)
def test_dkd_matches_reference(seed, b, c, alpha, beta, T):
    s, t, labels = _logits(seed, b, c)
    got = dkd_loss(s, t, labels, alpha=alpha, beta=beta, temperature=T)
    torch.testing.assert_close(got, dkd_reference(s, t, labels, alpha, beta, T), rtol=1e-6, atol=1e-9)


@FAST
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), c=st.integers(2, 12), T=st.sampled_from([1.0, 4.0]))
def test_dkd_decomposes_kd(seed, b, c, T):
    """Zhao et al. Eq. (4): KD = TCKD + (1 − p_T(target))·NCKD, per example."""
    s, t, labels = _logits(seed, b, c)
    tckd, nckd = dkd_parts(s, t, labels, temperature=T, reduction="none")
    non_target_mass = 1.0 - F.softmax(t / T, 1).gather(1, labels[:, None]).squeeze(1)
    kd = kd_loss(s, t, temperature=T, reduction="none")
    torch.testing.assert_close(tckd + non_target_mass * nckd, kd, rtol=1e-6, atol=1e-9)


def test_dkd_on_two_classes_is_kd():
    """With 2 classes the non-target part is a single class: NCKD = 0 and TCKD is plain KD."""
    s, t, labels = _logits(3, 7, 2)
    tckd, nckd = dkd_parts(s, t, labels)
    assert nckd.item() == 0.0
    torch.testing.assert_close(tckd, kd_loss(s, t))
    torch.testing.assert_close(dkd_loss(s, t, labels, alpha=1.0, beta=8.0), kd_loss(s, t))


def test_dkd_zero_for_identical_and_finite_gradients():
    s, _, labels = _logits(4, 5, 6, scale=30.0)
    s = s.float().requires_grad_(True)
    assert dkd_loss(s, s.detach().clone(), labels).item() == 0.0
    t = torch.randn(5, 6)
    t[:, 0] = -math.inf  # a class the teacher rules out
    loss = dkd_loss(s, t, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_rejects_bad_labels():
    s, t, labels = _logits(5, 4, 3)
    with pytest.raises(ValueError, match="labels"):
        dkd_loss(s, t, labels[:2])


# --------------------------------------------------------------------------------------------------
# DIST


def _pearson_ref(a, b):
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_dist_matches_reference():
    s, t, _ = _logits(6, 8, 10)
    T, beta, gamma = 2.0, 1.0, 2.0
    ys, yt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    expected = T**2 * (
        beta * (1 - _pearson_ref(ys, yt).mean()) + gamma * (1 - _pearson_ref(ys.T, yt.T).mean())
    )
    torch.testing.assert_close(dist_loss(s, t, beta=beta, gamma=gamma, temperature=T), expected)


@FAST
@given(seed=st.integers(0, 10_000), b=st.integers(2, 8), c=st.integers(2, 12))
def test_dist_zero_for_identical_and_bounded(seed, b, c):
    s, t, _ = _logits(seed, b, c)
    assert abs(dist_loss(s, s.clone()).item()) < 1e-9
    value = dist_loss(s, t).item()
    assert -1e-9 <= value <= 4.0 + 1e-9


def test_dist_positive_for_reversed_ranking_and_gradients_flow():
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.5]])
    s = (-t).clone().requires_grad_(True)  # the opposite class ranking
    loss = dist_loss(s, t)
    loss.backward()
    assert loss.item() > 1.0
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# DPO (kdkit.losses.preference)


def test_dpo_matches_formula():
    g = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=0.2)
    margin = 0.2 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(out.loss, -torch.log(torch.sigmoid(margin)).mean())
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards)
    assert not out.margins.requires_grad


def test_dpo_at_reference_is_log2_and_stable_for_huge_margins():
    x = torch.zeros(4)
    assert dpo_loss(x, x, x, x).loss.item() == pytest.approx(math.log(2.0))
    big = torch.full((3,), 1e6, requires_grad=True)
    out = dpo_loss(-big, big, torch.zeros(3), torch.zeros(3))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() > 1e4 and torch.isfinite(big.grad).all()
    smoothed = dpo_loss(big.detach(), -big.detach(), torch.zeros(3), torch.zeros(3), label_smoothing=0.1)
    assert smoothed.loss.item() > 1e4  # conservative DPO penalises overconfident margins
