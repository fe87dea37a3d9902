"""Divergences between the token distributions of a student and a teacher.

Every public divergence has the signature

    fn(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", <own kwarg>)

student_logits, teacher_logits: [..., V] (any float dtype; computed in float32 at least, float64 kept)
mask: [...] bool, True = the position counts (None = all count)
reduction: "mean" (average over counted positions), "sum", or "none" ([...], masked positions 0).

Per position the divergence is summed over the vocabulary, in nats, between the temperature-scaled
distributions softmax(logits / T). There is NO T² factor here: callers that want Hinton's gradient
scaling multiply by T² themselves (see `kdkit.losses.classification.kd_loss`).

Numerical conventions, shared by all functions:
- Scaled logits are clamped from below at `LOGIT_FLOOR` (-1e30) before the log-softmax, so -inf logits
  (masked vocabulary entries) give finite log-probabilities ~-1e30 whose probability is exactly 0.
  A term 0·log(0/q) is then exactly 0, and no gradient is NaN. Where a divergence is mathematically
  +inf (e.g. reverse KL when the student puts mass on a token the teacher gives -inf) the result is
  large but finite (~1e30 × that mass) with finite gradients; it is a signal that the vocabularies are
  misaligned, not a usable loss. A row whose logits are all -inf becomes the uniform distribution.
- Mixtures are built in probability space (the log of a mixture is a logsumexp of log-probabilities,
  see `_log_mix`), never by mixing log-probabilities.
- +inf or NaN logits are not supported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdkit.losses.registry import Param, Registry

DIVERGENCES: Registry[Callable[..., Tensor]] = Registry("divergence")

#: Scaled logits are clamped from below here: finite, and exp() of it (minus anything) is exactly 0.
LOGIT_FLOOR = -1e30
#: A generic f in `f_divergence` sees the ratio p_T/p_S clipped to [e^-30, e^30] (see there).
LOG_RATIO_LIMIT = 30.0

REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------------
# shared helpers


def reduce_positions(per_position: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Reduce a per-position loss over the positions that count.

    per_position: [...] (any shape)   mask: [...] bool (same shape), True = counts; None = all count
    reduction: "mean" -> scalar, sum over counted positions / their number (not the batch size);
               a fully masked input gives 0 (with zero gradients), not NaN.
               "sum"  -> scalar, sum over counted positions.
               "none" -> [...], masked positions set to 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        if mask.shape != per_position.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the positions {tuple(per_position.shape)}"
            )
        keep = mask.to(device=per_position.device, dtype=torch.bool)
        # where (not multiply) so a non-finite value at a masked position cannot leak into the result
        per_position = torch.where(keep, per_position, per_position.new_zeros(()))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = per_position.numel() if mask is None else keep.sum()
    if isinstance(count, int):
        return total / max(count, 1)
    return total / count.clamp_min(1).to(total.dtype)


def temperature_log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) over the last dim, in float32 at least, with -inf logits made finite.

    logits: [..., V]   Returns [..., V] log-probabilities (nats), every entry finite.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype != torch.float64:
        logits = logits.float()  # half-precision softmax loses the tail the divergences care about
    scaled = (logits / temperature).clamp_min(LOGIT_FLOOR)
    return torch.log_softmax(scaled, dim=-1)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) summed over the last dim; inputs finite log-probs [..., V] -> [...]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1-w)·q) for 0 < w < 1, in probability space. [..., V] -> [..., V].

    A two-term logsumexp(log w + log p, log(1-w) + log q), shifted by max(log p, log q) so that equal
    inputs give exactly log p (w·1 + (1-w)·1 = 1): a divergence from a distribution to its own mixture
    is then exactly 0, not ~1e-8 as with logaddexp, at about the same cost. The shift is detached: the
    value does not depend on it, so neither does the gradient.
    """
    shift = torch.maximum(log_p, log_q).detach()
    return shift + torch.log(weight_p * (log_p - shift).exp() + (1.0 - weight_p) * (log_q - shift).exp())


def _apply(
    per_vocab_position: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None,
    reduction: str,
) -> Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if reduction not in REDUCTIONS:  # fail before the expensive part
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    log_s = temperature_log_probs(student_logits, temperature)
    log_t = temperature_log_probs(teacher_logits, temperature)
    dtype = torch.promote_types(log_s.dtype, log_t.dtype)
    log_s, log_t = log_s.to(dtype), log_t.to(dtype)
    return reduce_positions(per_vocab_position(log_s, log_t), mask, reduction)


# ----------------------------------------------------------------------------------------------------
# per-position forms on log-probabilities: (log p_S, log p_T) [..., V] -> [...]


def _forward_kl(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl(log_t, log_s)


def _reverse_kl(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl(log_s, log_t)


def _jsd(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    if beta == 0.0:  # exact ends, not clamped: the scaled form would be 0 here
        return _forward_kl(log_s, log_t)
    if beta == 1.0:
        return _reverse_kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)  # M = β·p_T + (1-β)·p_S
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _tvd(log_s: Tensor, log_t: Tensor) -> Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def _skew_kl(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """KL(p ‖ α·p + (1-α)·q)."""
    if alpha == 0.0:
        return _kl(log_p, log_q)
    if alpha == 1.0:
        return (0.0 * log_p).sum(-1)  # zero, but still connected to the graph
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def _hellinger(log_s: Tensor, log_t: Tensor) -> Tensor:
    return ((0.5 * log_t).exp() - (0.5 * log_s).exp()).square().sum(-1)


def _chi2(log_s: Tensor, log_t: Tensor) -> Tensor:
    # p_S·(p_T/p_S − 1)², with the ratio clipped as in `_generic_f` (so p_S = 0 gives a large finite
    # value, not 0·inf); expm1 keeps the precision when the two distributions are close
    log_ratio = (log_t - log_s).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    weight = torch.maximum(log_s, log_t - LOG_RATIO_LIMIT).exp()
    return (weight * torch.expm1(log_ratio).square()).sum(-1)


def _akl(log_s: Tensor, log_t: Tensor, mu: float) -> Tensor:
    """Adaptive KL (Wu et al., COLING 2025): g_head·FKL + g_tail·RKL per position (see `adaptive_kl`)."""
    if mu == 0.0:  # empty tail: forward KL exactly
        return _forward_kl(log_s, log_t)
    if mu == 1.0:  # everything is tail: reverse KL exactly
        return _reverse_kl(log_s, log_t)
    with torch.no_grad():
        p_t, p_s = log_t.exp(), log_s.exp()
        sorted_t, order = p_t.sort(dim=-1)  # ascending: the tail comes first
        gap = (sorted_t - p_s.gather(-1, order)).abs()
        tail = torch.cumsum(sorted_t, dim=-1) < mu  # smallest tokens holding < mu of the teacher's mass
        gap_tail = (gap * tail).sum(-1)
        gap_head = (gap * ~tail).sum(-1)
        total = gap_head + gap_tail
        # identical distributions (no gap anywhere): both KLs are 0, any weights do; take ½, ½
        w_head = torch.where(total > 0, gap_head / total.clamp_min(1e-30), torch.full_like(total, 0.5))
    return w_head * _forward_kl(log_s, log_t) + (1.0 - w_head) * _reverse_kl(log_s, log_t)


def _generic_f(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def per_position(log_s: Tensor, log_t: Tensor) -> Tensor:
        # Clip the ratio to [e^-L, e^L] and weight by max(p_S, p_T·e^-L): equal to p_S·f(p_T/p_S) when the
        # ratio is inside the clip; outside it, as if the smaller probability were raised to e^-L times
        # the larger, so f never sees 0 or inf and 0·f(·) is never 0·inf.
        log_ratio = (log_t - log_s).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        weight = torch.maximum(log_s, log_t - LOG_RATIO_LIMIT).exp()
        return (weight * f(log_ratio.exp())).sum(-1)

    return per_position


# ----------------------------------------------------------------------------------------------------
# f-divergence generators: f(t) with f(1) = 0 convex, D_f(p_T ‖ p_S) = Σ_v p_S f(p_T / p_S)

F_GENERATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "kl": lambda t: torch.xlogy(t, t),  # KL(p_T ‖ p_S), forward
    "reverse_kl": lambda t: -torch.log(t),  # KL(p_S ‖ p_T)
    "hellinger": lambda t: (t.sqrt() - 1.0).square(),  # squared Hellinger Σ(√p_T − √p_S)², no ½
    "chi2": lambda t: (t - 1.0).square(),  # Pearson χ²: Σ (p_T − p_S)² / p_S
    "js": lambda t: 0.5 * (torch.xlogy(t, t) - torch.xlogy(1.0 + t, 0.5 * (1.0 + t))),  # JSD, M=½(p_T+p_S)
    "tv": lambda t: 0.5 * (t - 1.0).abs(),  # total variation ½Σ|p_T − p_S|
}

# Exact log-space forms of the named generators, used instead of the generic (clipped) path.
_F_STABLE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "hellinger": _hellinger,
    "chi2": _chi2,
    "js": lambda log_s, log_t: _jsd(log_s, log_t, 0.5),
    "tv": _tvd,
}


# ----------------------------------------------------------------------------------------------------
# public divergences


@DIVERGENCES.register(
    "fkl", "forward KL(p_T ‖ p_S): mean-seeking, the classic KD loss", aliases=("forward_kl",)
)
def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """KL(p_T ‖ p_S) = Σ_v p_T(v)·(log p_T(v) − log p_S(v)) per position.

    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns nats: a scalar for "mean"/"sum", else [...]. No T² factor.
    A teacher -inf entry contributes exactly 0; a student -inf where the teacher has mass gives a large
    finite value (the true value is +inf).
    """
    return _apply(_forward_kl, student_logits, teacher_logits, temperature, mask, reduction)


@DIVERGENCES.register(
    "rkl", "reverse KL(p_S ‖ p_T): mode-seeking, the on-policy default", aliases=("reverse_kl",)
)
def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """KL(p_S ‖ p_T) = Σ_v p_S(v)·(log p_S(v) − log p_T(v)) per position.

    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns nats: a scalar for "mean"/"sum", else [...]. No T² factor.
    Where the student puts mass on a token the teacher gives -inf the true value is +inf; here it is
    large but finite (~1e30 × that mass), with finite gradients.
    """
    return _apply(_reverse_kl, student_logits, teacher_logits, temperature, mask, reduction)


@DIVERGENCES.register(
    "jsd",
    "generalized JSD_β (GKD/TRL convention): β=0 forward KL, β=1 reverse KL",
    aliases=("generalized_jsd",),
    params={"beta": Param("weight of the teacher in the mixture M", low=0.0, high=1.0)},
)
def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    beta: float = 0.5,
) -> Tensor:
    """Generalized Jensen–Shannon divergence with weight β ∈ [0, 1], per position.

    For 0 < β < 1:  M = β·p_T + (1−β)·p_S  (in probability space: log M = logsumexp(log β + log p_T,
                    log(1−β) + log p_S), computed so that p_S = p_T gives exactly 0),
                    JSD_β = β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M)
    This is exactly TRL's `GKDTrainer.generalized_jsd_loss` (GKD paper, Agarwal et al. 2024, Eq. 1) for
    0 < β < 1. The scaled form tends to 0 at both ends, so the ends are special-cased, exactly (not
    clamped), also as in TRL:  β = 0 -> KL(p_T ‖ p_S) (forward), β = 1 -> KL(p_S ‖ p_T) (reverse).
    Note the jump: for small β > 0 the value is ≈ β·KL(p_T ‖ p_S), not KL(p_T ‖ p_S).

    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns nats: a scalar for "mean"/"sum", else [...]. No T² factor.
    """
    _check_unit("beta", beta)
    return _apply(
        lambda log_s, log_t: _jsd(log_s, log_t, beta),
        student_logits,
        teacher_logits,
        temperature,
        mask,
        reduction,
    )


@DIVERGENCES.register("tvd", "total variation ½Σ|p_T − p_S|: bounded in [0, 1]")
def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Total variation distance ½·Σ_v |p_T(v) − p_S(v)| per position, in [0, 1].

    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns a scalar for "mean"/"sum", else [...]. No T² factor.
    """
    return _apply(_tvd, student_logits, teacher_logits, temperature, mask, reduction)


@DIVERGENCES.register(
    "skl",
    "skew KL(p_T ‖ α·p_T + (1−α)·p_S) (DistiLLM)",
    aliases=("skew_kl",),
    params={"alpha": Param("skew: weight of p_T in the mixture (0 = forward KL)", low=0.0, high=1.0)},
)
def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024): KL(p_T ‖ α·p_T + (1−α)·p_S), α ∈ [0, 1].

    α = 0 is forward KL exactly; α = 1 is 0. The mixture is formed in probability space (a logsumexp), so
    the value stays finite (≤ log(1/α)) even where the student gives a token probability 0.
    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns nats: a scalar for "mean"/"sum", else [...]. No T² factor.
    """
    _check_unit("alpha", alpha)
    return _apply(
        lambda log_s, log_t: _skew_kl(log_t, log_s, alpha),
        student_logits,
        teacher_logits,
        temperature,
        mask,
        reduction,
    )


@DIVERGENCES.register(
    "srkl",
    "skew reverse KL(p_S ‖ α·p_S + (1−α)·p_T) (DistiLLM)",
    aliases=("skew_reverse_kl",),
    params={"alpha": Param("skew: weight of p_S in the mixture (0 = reverse KL)", low=0.0, high=1.0)},
)
def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 0.1,
) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(p_S ‖ α·p_S + (1−α)·p_T), α ∈ [0, 1].

    α = 0 is reverse KL exactly; α = 1 is 0. Finite (≤ log(1/α)) for α > 0 even with teacher zeros.
    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns nats: a scalar for "mean"/"sum", else [...]. No T² factor.
    """
    _check_unit("alpha", alpha)
    return _apply(
        lambda log_s, log_t: _skew_kl(log_s, log_t, alpha),
        student_logits,
        teacher_logits,
        temperature,
        mask,
        reduction,
    )


@DIVERGENCES.register(
    "f",
    "any f-divergence D_f(p_T ‖ p_S) = Σ p_S·f(p_T/p_S)",
    aliases=("f_divergence",),
    params={
        "f": Param(
            "generator: a name in F_GENERATORS or a callable on the ratio p_T/p_S",
            choices=tuple(F_GENERATORS),
        )
    },
)
def f_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    f: str | Callable[[Tensor], Tensor] = "kl",
) -> Tensor:
    """f-divergence D_f(p_T ‖ p_S) = Σ_v p_S(v)·f(p_T(v) / p_S(v)) per position.

    f: a name in `F_GENERATORS` ("kl" forward KL, "reverse_kl", "hellinger" = Σ(√p_T − √p_S)² without ½,
       "chi2" = Pearson Σ(p_T − p_S)²/p_S, "js" = JSD with M = ½(p_T + p_S), "tv"), or a callable on the
       elementwise ratio tensor t = p_T/p_S (convex, f(1) = 0).
    Named f use exact log-space forms (chi2 clips the ratio like a callable does, so p_S = 0 stays
    finite).
    A callable f sees the ratio clipped to [e^-30, e^30], weighted by max(p_S, p_T·e^-30): exact while
    the ratio is inside the clip, finite (but no longer exact) outside it, e.g. where either
    distribution has a zero.
    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns a scalar for "mean"/"sum", else [...]. No T² factor.
    """
    if isinstance(f, str):
        if f not in _F_STABLE:
            raise ValueError(f"unknown f-divergence generator {f!r} (known: {', '.join(F_GENERATORS)})")
        per_position = _F_STABLE[f]
    elif callable(f):
        per_position = _generic_f(f)
    else:
        raise TypeError(f"f must be a name or a callable, got {type(f).__name__}")
    return _apply(per_position, student_logits, teacher_logits, temperature, mask, reduction)


@DIVERGENCES.register(
    "akl",
    "adaptive KL: forward and reverse KL weighted per token by the head / tail gap (AKL)",
    aliases=("adaptive_kl",),
    params={
        "mu": Param("teacher mass of the tail (0 = forward KL, 1 = reverse KL)", low=0.0, high=1.0),
    },
)
def adaptive_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    mu: float = 0.5,
) -> Tensor:
    """Adaptive Kullback–Leibler divergence (AKL; Wu et al., "Rethinking KL divergence in KD for LLMs").

    Per position, the vocabulary is split by the teacher: the *tail* is the set of lowest-probability
    tokens whose cumulative teacher mass stays below `mu`; the *head* is the rest. With
    gap_head = Σ_head |p_T − p_S| and gap_tail = Σ_tail |p_T − p_S|:
        AKL = g_head·KL(p_T ‖ p_S) + g_tail·KL(p_S ‖ p_T),  g = gap / (gap_head + gap_tail)
    Forward KL fits the head and reverse KL the tail early in training, so the weight goes to the
    divergence that fixes the larger gap. The weights are detached (no gradient flows through the
    split). mu ∈ [0, 1] (paper default 0.5): mu = 0 is forward KL exactly, mu = 1 reverse KL exactly.
    Where p_S = p_T the weights are ½, ½ (and both KLs 0).
    student_logits, teacher_logits: [..., V]   mask: [...] bool, True = counts
    Returns nats: a scalar for "mean"/"sum", else [...]. No T² factor.
    """
    _check_unit("mu", mu)
    return _apply(
        lambda log_s, log_t: _akl(log_s, log_t, mu),
        student_logits,
        teacher_logits,
        temperature,
        mask,
        reduction,
    )


__all__ = [
    "DIVERGENCES",
    "F_GENERATORS",
    "LOGIT_FLOOR",
    "LOG_RATIO_LIMIT",
    "adaptive_kl",
    "f_divergence",
    "forward_kl",
    "generalized_jsd",
    "reduce_positions",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "temperature_log_probs",
    "total_variation",
]
