"""Divergences against an independent float64 probability-space reference, plus the edge cases
(-inf logits, full masking, huge logits) and the reduction contract."""

from __future__ import annotations

import math
from collections.abc import Callable

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkit.losses import (
    DIVERGENCES,
    F_GENERATORS,
    UnknownNameError,
    f_divergence,
    forward_kl,
    generalized_jsd,
    reduce_positions,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)

FAST = settings(max_examples=50, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention (10x slower on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# (registry name, kwargs): every divergence with a few of its own knobs
CASES: list[tuple[str, dict]] = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}),
    ("tvd", {}),
    ("skl", {"alpha": 0.1}),
    ("skl", {"alpha": 0.5}),
    ("srkl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.7}),
    *[("f", {"f": name}) for name in F_GENERATORS],
]
IDS = [f"{n}-{next(iter(kw.values()), '')}" for n, kw in CASES]


# ---------------------------------------------------------------------------------------------------
# independent reference: probabilities in float64 numpy, the textbook formulas


def _softmax(x: np.ndarray, t: float) -> np.ndarray:
    z = x / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(-1)


REF_F: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "kl": lambda t: t * np.log(t),
    "reverse_kl": lambda t: -np.log(t),
    "hellinger": lambda t: (np.sqrt(t) - 1) ** 2,
    "chi2": lambda t: (t - 1) ** 2,
    "js": lambda t: 0.5 * (t * np.log(t) - (1 + t) * np.log((1 + t) / 2)),
    "tv": lambda t: 0.5 * np.abs(t - 1),
}


def reference(name: str, s: np.ndarray, t: np.ndarray, temperature: float, **kw) -> np.ndarray:
    ps, pt = _softmax(s, temperature), _softmax(t, temperature)
    if name == "fkl":
        return _kl(pt, ps)
    if name == "rkl":
        return _kl(ps, pt)
    if name == "jsd":
        b = kw["beta"]
        if b == 0:
            return _kl(pt, ps)
        if b == 1:
            return _kl(ps, pt)
        m = (1 - b) * ps + b * pt
        return b * _kl(pt, m) + (1 - b) * _kl(ps, m)
    if name == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    if name == "skl":
        a = kw["alpha"]
        return _kl(pt, a * pt + (1 - a) * ps)
    if name == "srkl":
        a = kw["alpha"]
        return _kl(ps, a * ps + (1 - a) * pt)
    if name == "f":
        f = REF_F[kw["f"]] if isinstance(kw["f"], str) else kw["f"]
        return (ps * f(pt / ps)).sum(-1)
    raise KeyError(name)


def _ratio_inside_clip(s: np.ndarray, t: np.ndarray, temperature: float) -> np.ndarray:
    """Rows where every p_T/p_S is within [e^-30, e^30]: chi2 is unbounded and exact only there."""
    log_ratio = np.log(_softmax(t, temperature)) - np.log(_softmax(s, temperature))
    return (np.abs(log_ratio) <= 30).all(-1)


def call(name: str, s: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    return DIVERGENCES.get(name)(s, t, **kw)


@st.composite
def logit_pairs(draw, low: float = -30.0, high: float = 30.0):
    batch = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    vocab = draw(st.integers(2, 12))
    elements = st.floats(low, high, allow_nan=False, allow_infinity=False, width=64)
    s = draw(hnp.arrays(np.float64, (*batch, vocab), elements=elements))
    t = draw(hnp.arrays(np.float64, (*batch, vocab), elements=elements))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    return s, t, temperature


# ---------------------------------------------------------------------------------------------------
# agreement with the reference


@FAST
@given(data=logit_pairs())
def test_matches_float64_reference(data):
    s, t, temperature = data
    for name, kw in CASES:
        _check_reference(name, kw, s, t, temperature)


def _check_reference(name: str, kw: dict, s: np.ndarray, t: np.ndarray, temperature: float) -> None:
    expected = reference(name, s, t, temperature, **kw)
    got = call(
        name, torch.from_numpy(s), torch.from_numpy(t), temperature=temperature, reduction="none", **kw
    )
    assert got.dtype == torch.float64 and got.shape == expected.shape
    if name == "f" and kw["f"] == "chi2":
        inside = _ratio_inside_clip(s, t, temperature)
        got, expected = got.numpy()[inside], expected[inside]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-7, atol=1e-10, err_msg=f"{name} {kw}")


@FAST
@given(data=logit_pairs(-8.0, 8.0))
def test_float32_close_to_reference(data):
    s, t, temperature = data
    for name, kw in CASES:
        expected = reference(name, s, t, temperature, **kw)
        s32, t32 = torch.from_numpy(s).float(), torch.from_numpy(t).float()
        got = call(name, s32, t32, temperature=temperature, reduction="none", **kw)
        assert got.dtype == torch.float32
        got = got.numpy()
        if name == "f" and kw["f"] == "chi2":
            inside = _ratio_inside_clip(s, t, temperature)
            got, expected = got[inside], expected[inside]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"{name} {kw}")


@FAST
@given(data=logit_pairs(-4.0, 4.0), which=st.sampled_from(sorted(REF_F)))
def test_callable_f_matches_reference(data, which):
    """A user-supplied f goes through the generic (clipped-ratio) path: exact for moderate ratios."""
    s, t, temperature = data
    torch_f = {
        "kl": lambda r: r * torch.log(r),
        "reverse_kl": lambda r: -torch.log(r),
        "hellinger": lambda r: (r.sqrt() - 1) ** 2,
        "chi2": lambda r: (r - 1) ** 2,
        "js": lambda r: 0.5 * (r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2)),
        "tv": lambda r: 0.5 * (r - 1).abs(),
    }[which]
    got = f_divergence(
        torch.from_numpy(s), torch.from_numpy(t), temperature=temperature, f=torch_f, reduction="none"
    )
    np.testing.assert_allclose(got.numpy(), reference("f", s, t, temperature, f=which), rtol=1e-7, atol=1e-10)


def test_generalized_jsd_matches_literature_values():
    """Hand-computed on two-point distributions p_T = (1, 0)-ish: closed forms of JSD with β."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # p_S = (½, ½)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # p_T = (¾, ¼)
    b = 0.25
    pt, ps = torch.tensor([0.75, 0.25], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    m = (1 - b) * ps + b * pt
    expected = b * (pt * (pt / m).log()).sum() + (1 - b) * (ps * (ps / m).log()).sum()
    assert generalized_jsd(s, t, beta=b).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.slow
def test_generalized_jsd_matches_trl():
    """Same value as TRL's GKD loss for every β, so benchmarks against TRL compare like with like."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(2, 5, 11, dtype=torch.float64)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        trl = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=2.0, reduction="none").sum(-1)
        ours = generalized_jsd(s, t, beta=beta, temperature=2.0, reduction="none")
        torch.testing.assert_close(ours, trl, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# divergence axioms


@FAST
@given(data=logit_pairs())
def test_non_negative_and_zero_on_equal(data):
    s, t, temperature = data
    s32, t32 = torch.from_numpy(s).float(), torch.from_numpy(t).float()
    for name, kw in CASES:
        value = call(name, s32, t32, temperature=temperature, reduction="none", **kw)
        assert (value >= -1e-6).all(), (name, kw)
        same = call(name, s32, s32.clone(), temperature=temperature, reduction="none", **kw)
        assert (same == 0).all(), (name, kw)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_positive_on_clearly_different(name, kw):
    s = torch.zeros(3, 6)
    t = s.clone()
    t[:, 0] = 4.0  # the teacher is sure of token 0, the student is uniform
    value = call(name, s, t, reduction="none", **kw)
    assert (value > 1e-2).all()
    # and the other way around (student sure, teacher uniform)
    assert (call(name, t, s, reduction="none", **kw) > 1e-2).all()


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_shift_invariant(name, kw):
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    a = call(name, s, t, temperature=2.0, **kw)
    b = call(name, s + 3.0, t - 7.0, temperature=2.0, **kw)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_jsd_ends_are_exactly_forward_and_reverse_kl():
    s, t = torch.randn(3, 4, 50) * 3, torch.randn(3, 4, 50) * 3
    mask = torch.rand(3, 4) > 0.3
    for reduction in ("none", "sum", "mean"):
        kw = {"temperature": 1.7, "mask": mask, "reduction": reduction}
        assert torch.equal(generalized_jsd(s, t, beta=0.0, **kw), forward_kl(s, t, **kw))
        assert torch.equal(generalized_jsd(s, t, beta=1.0, **kw), reverse_kl(s, t, **kw))
    # the ends are not the limits of the scaled form: close to the ends JSD_β is small, not the KL
    near0 = generalized_jsd(s, t, beta=1e-4)
    assert near0 < 1e-2 * forward_kl(s, t)


def test_skew_kl_ends():
    s, t = torch.randn(5, 30), torch.randn(5, 30)
    assert torch.equal(skew_kl(s, t, alpha=0.0), forward_kl(s, t))
    assert torch.equal(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t))
    assert skew_kl(s, t, alpha=1.0).item() == 0.0
    assert skew_reverse_kl(s, t, alpha=1.0).item() == 0.0


def test_named_f_agree_with_dedicated_functions():
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    assert torch.equal(f_divergence(s, t, f="kl"), forward_kl(s, t))
    assert torch.equal(f_divergence(s, t, f="reverse_kl"), reverse_kl(s, t))
    assert torch.equal(f_divergence(s, t, f="tv"), total_variation(s, t))
    assert torch.equal(f_divergence(s, t, f="js"), generalized_jsd(s, t, beta=0.5))


def test_bad_arguments_raise():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, s, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        skew_kl(s, s, alpha=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        forward_kl(s, torch.randn(2, 6))
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(s, s, reduction="batchmean")
    with pytest.raises(ValueError, match="hellinger"):
        f_divergence(s, s, f="helinger")


# ---------------------------------------------------------------------------------------------------
# numerical safety


@st.composite
def logits_with_neg_inf(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 10)))
    elements = st.floats(-20, 20, allow_nan=False, width=32)
    out = []
    for _ in range(2):
        x = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=elements)))
        holes = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
        keep = draw(st.integers(0, shape[-1] - 1))
        holes[..., keep] = False  # at least one finite entry per row
        out.append(x.masked_fill(holes, -math.inf))
    return out[0], out[1], draw(st.sampled_from([0.5, 1.0, 3.0]))


@FAST
@given(data=logits_with_neg_inf())
def test_neg_inf_logits_give_finite_values_and_gradients(data):
    s0, t0, temperature = data
    for name, kw in CASES:
        # a teacher that trains (e.g. through a learned projector) must be safe too
        s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
        value = call(name, s, t, temperature=temperature, **kw)
        value.backward()
        assert torch.isfinite(value) and value >= -1e-6, (name, kw)
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all(), (name, kw)
        assert (s.grad[s0 == -math.inf] == 0).all(), (name, kw)  # impossible tokens get no gradient


@FAST
@given(data=logits_with_neg_inf())
def test_teacher_zeros_are_exact_in_forward_kl(data):
    """Teacher -inf where the student is finite: 0·log 0 = 0 exactly, value equals the reference."""
    s, t, temperature = data
    s = torch.where(torch.isinf(s), torch.zeros_like(s), s)  # student finite everywhere
    got = forward_kl(s.double(), t.double(), temperature=temperature, reduction="none")
    expected = reference("fkl", s.double().numpy(), t.double().numpy(), temperature)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7, atol=1e-12)


def test_reverse_kl_onto_teacher_zero_is_large_but_finite():
    s = torch.zeros(1, 4, requires_grad=True)
    t = torch.tensor([[0.0, 0.0, 0.0, -math.inf]])
    value = reverse_kl(s, t)
    value.backward()
    assert torch.isfinite(value) and value > 1e20
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_huge_logits_are_finite(name, kw):
    s = (torch.randn(3, 40) * 1e4).requires_grad_(True)
    t = torch.randn(3, 40) * 1e4
    value = call(name, s, t, **kw)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    assert call(name, s, s.detach().clone(), **kw).item() == 0.0


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_fully_masked_is_zero_with_zero_gradients(name, kw):
    s = torch.randn(2, 3, 7, requires_grad=True)
    t = torch.randn(2, 3, 7)
    t[0, 0] = -math.inf  # even a padding row with no finite entry
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "sum"):
        value = call(name, s, t, mask=mask, reduction=reduction, **kw)
        (grad,) = torch.autograd.grad(value, s)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert torch.equal(call(name, s, t, mask=mask, reduction="none", **kw), torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast(dtype):
    s, t = torch.randn(4, 64), torch.randn(4, 64)
    low = forward_kl(s.to(dtype), t.to(dtype))
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, forward_kl(s.to(dtype).float(), t.to(dtype).float()))


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_gradcheck(name, kw):
    s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    if name == "tvd" or kw.get("f") == "tv":  # |x| has a kink at 0; keep away from it
        t = (s.detach() + 1.5 * torch.eye(2, 5, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: call(name, a, b, temperature=1.3, **kw), (s, t))


# ---------------------------------------------------------------------------------------------------
# reductions


@pytest.mark.parametrize(("name", "kw"), CASES, ids=IDS)
def test_mean_divides_by_valid_positions_not_batch_size(name, kw):
    s, t = torch.randn(4, 5, 11), torch.randn(4, 5, 11)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :3] = True  # 3 valid positions in a batch of 4 sequences of 5
    per_position = call(name, s, t, reduction="none", **kw)
    mean = call(name, s, t, mask=mask, reduction="mean", **kw)
    torch.testing.assert_close(mean, per_position[0, :3].sum() / 3)
    assert not torch.isclose(mean, per_position[0, :3].sum() / 4)


@FAST
@given(data=logit_pairs(-10.0, 10.0), mask_seed=st.integers(0, 2**16))
def test_reductions_are_consistent(data, mask_seed):
    s, t, temperature = (torch.from_numpy(data[0]), torch.from_numpy(data[1]), data[2])
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(mask_seed)) > 0.4
    for name, kw in CASES:
        _check_reductions(name, kw, s, t, temperature, mask)


def _check_reductions(
    name: str, kw: dict, s: torch.Tensor, t: torch.Tensor, temperature: float, mask: torch.Tensor
) -> None:
    none = call(name, s, t, temperature=temperature, mask=mask, reduction="none", **kw)
    total = call(name, s, t, temperature=temperature, mask=mask, reduction="sum", **kw)
    mean = call(name, s, t, temperature=temperature, mask=mask, reduction="mean", **kw)
    assert none.shape == s.shape[:-1] and (none[~mask] == 0).all()
    torch.testing.assert_close(none.sum(), total)
    torch.testing.assert_close(mean * max(int(mask.sum()), 1), total)
    unmasked = call(name, s, t, temperature=temperature, reduction="none", **kw)
    torch.testing.assert_close(none[mask], unmasked[mask])


def test_reduce_positions_contract():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    mask = torch.tensor([[True, True], [True, False]])
    assert reduce_positions(x, mask, "sum").item() == 6.0
    assert reduce_positions(x, mask, "mean").item() == 2.0
    assert torch.equal(reduce_positions(x, mask, "none"), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert reduce_positions(torch.tensor([1.0, 3.0]), None, "mean").item() == 2.0
    with pytest.raises(ValueError, match="mask shape"):
        reduce_positions(x, mask[0], "mean")
    with pytest.raises(ValueError, match="reduction"):
        reduce_positions(x, mask, "batchmean")


# ---------------------------------------------------------------------------------------------------
# registry


def test_registry_names_aliases_and_error():
    assert DIVERGENCES.names() == ["fkl", "rkl", "jsd", "tvd", "skl", "srkl", "f", "akl"]
    aliases = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "generalized_jsd": generalized_jsd,
        "skew_kl": skew_kl,
        "skew_reverse_kl": skew_reverse_kl,
        "f_divergence": f_divergence,
        "tvd": total_variation,
    }
    for alias, fn in aliases.items():
        assert DIVERGENCES.get(alias) is fn
    for name, description, _ in DIVERGENCES.items():
        assert description and "\n" not in description, name
    with pytest.raises(UnknownNameError) as err:
        DIVERGENCES.get("rkll")
    message = str(err.value)
    assert "rkll" in message
    for name in DIVERGENCES.names():
        assert name in message
