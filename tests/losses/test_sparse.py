"""Sparse-target losses: top-k (renormalised / with tail) and random-sampling KD against dense formulas."""

from collections import Counter

import pytest
import torch

from kdkit.losses import forward_kl, generalized_jsd, reverse_kl, total_variation
from kdkit.losses.sparse import (
    sampled_cross_entropy,
    sampled_target,
    sparse_divergence,
    topk_divergence,
    topk_target,
    unique_with_counts,
)


def _logits(n=6, v=20, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


def test_topk_target_matches_dense_distribution():
    t = _logits()
    out = topk_target(t, 5, temperature=2.0)
    log_p = torch.log_softmax(t / 2.0, -1)
    assert torch.equal(out["ids"], log_p.topk(5, -1).indices)
    kept = log_p.gather(-1, out["ids"]).exp().sum(-1)
    torch.testing.assert_close(out["tail_logprob"].exp(), 1 - kept)
    torch.testing.assert_close(out["entropy"], -(log_p.exp() * log_p).sum(-1))


def test_unique_with_counts_matches_counter():
    drawn = torch.randint(0, 6, (50, 12))
    ids, counts = unique_with_counts(drawn)
    for row, uid, cnt in zip(drawn.tolist(), ids.tolist(), counts.tolist()):
        expected = sorted(Counter(row).items())
        got = [(i, c) for i, c in zip(uid, cnt) if c > 0]
        assert got == expected
        assert all(c == 0 and i == 0 for i, c in zip(uid[len(expected) :], cnt[len(expected) :]))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_sampled_weights_are_unbiased_for_teacher_probs(tau):
    t = _logits(n=3, v=10, scale=1.5)
    rounds = 3000
    out = sampled_target(
        t.expand(rounds, 3, 10), 12, proposal_temperature=tau, generator=torch.Generator().manual_seed(1)
    )
    total = torch.zeros(rounds, 3, 10, dtype=torch.float64).scatter_add_(
        -1, out["ids"], out["weights"].double()
    )
    # each id's mean weight is within a few standard errors of p_T
    torch.testing.assert_close(total.mean(0), torch.softmax(t, -1), atol=0.01, rtol=0)


def _grad(loss_fn, student):
    s = student.clone().requires_grad_(True)
    loss_fn(s).backward()
    return s.grad


def test_sampled_gradient_is_unbiased_but_topk_is_not():
    """Mean of the random-sampling gradient over many draws = the dense forward-KL gradient."""
    teacher = _logits(n=4, v=30, scale=1.0, seed=2)
    student = _logits(n=4, v=30, scale=1.0, seed=3)
    dense = _grad(lambda s: forward_kl(s, teacher, reduction="sum"), student)
    rounds = 4000  # independent draws, one per copy of the positions
    tgt = sampled_target(teacher.expand(rounds, 4, 30), 12, generator=torch.Generator().manual_seed(4))
    grads = _grad(
        lambda s: sampled_cross_entropy(s, tgt["ids"], tgt["weights"], reduction="sum"),
        student.expand(rounds, 4, 30),
    )
    mean, stderr = grads.mean(0), grads.std(0) / rounds**0.5
    assert ((mean - dense).abs() <= 4 * stderr + 1e-6).float().mean() > 0.99
    assert (mean - dense).abs().max() < 0.01
    # top-k (renormalised or with tail) is a deterministic, biased gradient
    tk = topk_target(teacher, 8)
    for tail in (None, tk["tail_logprob"]):

        def loss(s, tail=tail):
            return topk_divergence(s, tk["ids"], tk["logprobs"], tail_logprob=tail, reduction="sum")

        g_topk = _grad(loss, student)
        assert (g_topk - dense).abs().max() > 10 * (mean - dense).abs().max()


def test_sampled_value_is_unbiased_with_entropy():
    teacher, student = _logits(n=3, v=15, seed=5), _logits(n=3, v=15, seed=6)
    rounds = 3000
    tgt = sampled_target(
        teacher.expand(rounds, 3, 15),
        12,
        proposal_temperature=0.7,
        generator=torch.Generator().manual_seed(7),
    )
    values = sampled_cross_entropy(
        student.expand(rounds, 3, 15), tgt["ids"], tgt["weights"], entropy=tgt["entropy"], reduction="none"
    ).mean(-1)
    se = values.std() / rounds**0.5
    assert abs(values.mean() - forward_kl(student, teacher)) < 4 * se + 1e-4


@pytest.mark.parametrize("fn,name", [(forward_kl, "fkl"), (reverse_kl, "rkl"), (generalized_jsd, "jsd")])
def test_topk_with_tail_is_exact_when_k_is_v_and_a_lower_bound_otherwise(fn, name):
    teacher, student = _logits(seed=8), _logits(seed=9)
    full = topk_target(teacher, teacher.shape[-1])
    exact = topk_divergence(
        student,
        full["ids"],
        full["logprobs"],
        tail_logprob=full["tail_logprob"],
        divergence=name,
        reduction="none",
    )
    torch.testing.assert_close(exact, fn(student, teacher, reduction="none"))
    part = topk_target(teacher, 4)
    coarse = topk_divergence(
        student,
        part["ids"],
        part["logprobs"],
        tail_logprob=part["tail_logprob"],
        divergence=name,
        reduction="none",
    )
    dense = fn(student, teacher, reduction="none")
    assert (coarse <= dense + 1e-9).all() and (coarse < dense - 1e-3).any()


@pytest.mark.parametrize(
    "fn,name,kw",
    [
        (forward_kl, "fkl", {}),
        (generalized_jsd, "jsd", {"beta": 0.3}),
        (total_variation, "tvd", {}),
    ],
)
def test_renormalised_topk_is_the_divergence_to_the_zero_filled_target(fn, name, kw):
    teacher, student = _logits(seed=10), _logits(seed=11)
    tk = topk_target(teacher, 5)
    got = topk_divergence(student, tk["ids"], tk["logprobs"], divergence=name, reduction="none", **kw)
    zero_filled = torch.full_like(teacher, float("-inf")).scatter(-1, tk["ids"], tk["logprobs"])
    torch.testing.assert_close(got, fn(student, zero_filled, reduction="none", **kw))


def test_temperature_scales_the_student_only():
    teacher, student = _logits(seed=12), _logits(seed=13)
    tk = topk_target(teacher, 20)  # k = V: exact
    got = topk_divergence(
        student, tk["ids"], tk["logprobs"], tail_logprob=tk["tail_logprob"], temperature=3.0
    )
    torch.testing.assert_close(got, forward_kl(student / 3.0, teacher))


def test_mask_and_reduction():
    teacher, student = _logits(seed=14), _logits(seed=15)
    tk = topk_target(teacher, 4)
    mask = torch.tensor([True, False, True, True, False, True])
    per = topk_divergence(
        student, tk["ids"], tk["logprobs"], tail_logprob=tk["tail_logprob"], reduction="none"
    )
    got = topk_divergence(student, tk["ids"], tk["logprobs"], tail_logprob=tk["tail_logprob"], mask=mask)
    torch.testing.assert_close(got, per[mask].mean())


def test_refusals_say_why():
    teacher, student = _logits(seed=16), _logits(seed=17)
    tk = topk_target(teacher, 4)
    with pytest.raises(ValueError, match="tail"):
        topk_divergence(student, tk["ids"], tk["logprobs"], divergence="rkl")
    with pytest.raises(ValueError, match="tail"):
        topk_divergence(student, tk["ids"], tk["logprobs"], divergence="jsd", beta=1.0)
    tgt = sampled_target(teacher, 12)
    with pytest.raises(ValueError, match="forward KL only"):
        sparse_divergence(student, tgt["ids"], weights=tgt["weights"], divergence="rkl")
    # reverse KL with the tail is defined (coarsened)
    assert torch.isfinite(
        topk_divergence(student, tk["ids"], tk["logprobs"], tail_logprob=tk["tail_logprob"], divergence="rkl")
    )


def test_gradients_are_finite_with_peaked_teachers_and_all_ids_kept():
    teacher = torch.tensor([[50.0, 0.0, -50.0, -50.0]])
    student = torch.zeros(1, 4, requires_grad=True)
    tk = topk_target(teacher, 4)
    loss = topk_divergence(
        student, tk["ids"], tk["logprobs"], tail_logprob=tk["tail_logprob"], divergence="jsd"
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
def test_padding_slots_hold_no_mass(name):
    """A target padded to K with id 0 and log-prob LOGIT_FLOOR equals the unpadded one."""
    from kdkit.losses.divergences import LOGIT_FLOOR

    teacher, student = _logits(seed=18), _logits(seed=19)
    tk = topk_target(teacher, 3)
    ids = torch.cat([tk["ids"], torch.zeros_like(tk["ids"][:, :2])], dim=-1)
    logprobs = torch.cat([tk["logprobs"], torch.full_like(tk["logprobs"][:, :2], LOGIT_FLOOR)], dim=-1)
    for tail in (tk["tail_logprob"], None):
        if tail is None and name == "rkl":
            continue
        padded = topk_divergence(student, ids, logprobs, tail_logprob=tail, divergence=name, reduction="none")
        plain = topk_divergence(
            student, tk["ids"], tk["logprobs"], tail_logprob=tail, divergence=name, reduction="none"
        )
        torch.testing.assert_close(padded, plain)
