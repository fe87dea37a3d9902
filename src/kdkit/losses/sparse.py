"""Distillation losses against *sparse* teacher targets (what a logit cache or a served teacher stores).

A sparse target keeps, per position, a few vocabulary ids of the teacher's distribution p_T:

- **top-k** (`topk_target`): the k most likely ids with their log-probabilities, optionally the
  log of the residual "tail" mass r = 1 − Σ_kept p_T outside them;
- **random sampling** (`sampled_target`, Anshumann et al. 2025, "Sparse Logit Sampling"): N ids
  drawn with replacement from a proposal q ∝ p_T^τ, kept as unique ids with importance weights
  w_i = (c_i / N) · p_T(i) / q(i)  (c_i = how often id i was drawn). E[w_i] = p_T(i) exactly, so
  −Σ_i w_i log p_S(i) is an *unbiased* estimate of the cross-entropy H(p_T, p_S) and its gradient
  an unbiased estimate of the dense forward-KL gradient. With τ = 1 the weights are c_i / N.

Shapes (any number of leading position dims `...`):
  student_logits [..., V] · ids [..., K] long · logprobs / weights [..., K] · tail_logprob,
  entropy [...] · mask [...] bool (True = the position counts).
Values are nats per position; reduction "mean" (over counted positions) / "sum" / "none" as in
`kdkit.losses.divergences.reduce_positions`. The teacher side is already at its temperature (a cache
records the temperature it was built at); `temperature` here scales the *student* logits only.

Which divergences are defined, and which are biased, on each kind of target:

- **renormalised top-k** p̃_T = p_T / Σ_kept p_T on the kept ids, 0 elsewhere: forward KL, JSD
  (0 < β < 1), TVD, skew KL, Hellinger, χ² are computed *exactly for p̃_T*; reverse KL (and JSD β=1,
  f=reverse_kl) is +inf and refused. Biased all the same: p̃_T is not p_T. It overstates the kept
  ids by 1/(1 − r) and trains the student to put no mass elsewhere (overconfident, worse calibration).
- **top-k + tail bucket**: every divergence is defined, between the (k + 1)-bucket coarsenings of
  p_T and p_S (the kept ids, then "everything else"). Each is a lower bound of the true value (data
  processing) that ignores *how* either model spreads its tail mass. Reverse KL on top-k is the
  worst case: the student may reshape its tail freely, e.g. shrink its mass on ids outside the kept
  set that the teacher likes, at no cost.
- **random sampling**: forward KL only, unbiased (the cross-entropy estimate, minus H(p_T) when the
  entropy is stored so that values compare with a dense KL). Reverse KL, JSD, TVD and the others need
  p_T at the ids the *student* puts mass on, which a sample from the teacher does not give: refused.

The renormalised target is computed exactly as a divergence to the full student: because p̃_T is 0
on every id outside the kept set, the ratio p̃_T / p_S is constant (0) there, so lumping those ids
into one bucket loses nothing (the data-processing inequality is an equality). That is why the same
bucket code computes both rows, with the teacher's tail bucket set to 0 mass for the renormalised one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdkit.losses.divergences import DIVERGENCES, LOGIT_FLOOR, reduce_positions, temperature_log_probs

# ----------------------------------------------------------------------------------------------------
# building sparse targets from dense teacher logits (what a cache writer or a server does)


def topk_target(
    teacher_logits: Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    log_probs: bool = False,
    entropy: Tensor | None = None,
) -> dict[str, Tensor]:
    """The k most likely ids of softmax(teacher_logits / T), with the tail mass and the entropy.

    teacher_logits: [..., V]; log_probs: they are already log-probabilities at the temperature (a
    cache writer encoding one batch several ways skips the log-softmax); entropy: H(p_T) [...] if
    already computed. Returns a dict of
      ids [..., k] long (descending probability), logprobs [..., k] float32 (log p_T, not renormalised),
      tail_logprob [...] (log of the mass outside the kept ids; ~LOGIT_FLOOR when k = V),
      entropy [...] (H(p_T) in nats, over the full vocabulary).
    """
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
    log_p = teacher_logits if log_probs else temperature_log_probs(teacher_logits, temperature)
    logprobs, ids = log_p.topk(k, dim=-1)
    return {
        "ids": ids,
        "logprobs": logprobs,
        "tail_logprob": _log_mass_outside(log_p, ids),
        "entropy": distribution_entropy(log_p) if entropy is None else entropy,
    }


def sampled_target(
    teacher_logits: Tensor,
    draws: int,
    *,
    proposal_temperature: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    log_probs: bool = False,
    entropy: Tensor | None = None,
) -> dict[str, Tensor]:
    """Random-sampling KD target: `draws` ids from q ∝ p_T^τ, as unique ids with importance weights.

    log_probs / entropy: as for `topk_target` (inputs already log-probabilities; H(p_T) given).

    teacher_logits: [..., V]; p_T = softmax(teacher_logits / temperature); τ = proposal_temperature
    (τ < 1 flattens the proposal, drawing more of the tail; τ = 1 samples p_T itself).
    Returns a dict of (K = draws; slots beyond a position's unique ids are padding: id 0, count 0,
    weight 0, logprob LOGIT_FLOOR):
      ids [..., K] long (unique ids first, ascending), counts [..., K] long (times drawn),
      weights [..., K] float32: (c_i / N)·p_T(i)/q(i), with E[weights] = p_T over the draws,
      logprobs [..., K] float32 (log p_T of each id), log_z [...] = log Σ_v p_T(v)^τ,
      entropy [...] (H(p_T), nats).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if not proposal_temperature > 0:
        raise ValueError(f"proposal_temperature must be > 0, got {proposal_temperature}")
    log_p = teacher_logits if log_probs else temperature_log_probs(teacher_logits, temperature)
    lead, vocab = log_p.shape[:-1], log_p.shape[-1]
    flat = log_p.reshape(-1, vocab)
    log_q_unnorm = proposal_temperature * flat
    log_z = torch.logsumexp(log_q_unnorm, dim=-1)  # [n]
    q = (log_q_unnorm - log_z[:, None]).exp()
    drawn = torch.multinomial(q, draws, replacement=True, generator=generator)  # [n, N]
    ids, counts = unique_with_counts(drawn)
    valid = counts > 0
    logprobs = flat.gather(-1, ids).masked_fill(~valid, LOGIT_FLOOR)
    weights = importance_weights(counts, logprobs, log_z, draws, proposal_temperature)
    shape = (*lead, draws)
    return {
        "ids": ids.reshape(shape),
        "counts": counts.reshape(shape),
        "weights": weights.reshape(shape),
        "logprobs": logprobs.reshape(shape),
        "log_z": log_z.reshape(lead),
        "entropy": distribution_entropy(log_p) if entropy is None else entropy,
    }


def unique_with_counts(drawn: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the unique values of `drawn` [n, N] (ascending, left-aligned) and their counts.

    Returns (ids [n, N] long, counts [n, N] long); slots past a row's unique values hold id 0, count 0.
    """
    n, width = drawn.shape
    ordered, _ = drawn.sort(dim=-1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = first.long().cumsum(-1) - 1  # which unique slot each draw belongs to
    ids = torch.zeros_like(ordered)
    ids.scatter_(-1, slot, ordered)  # every draw of one value writes the same value
    counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
    return ids, counts


def importance_weights(
    counts: Tensor, logprobs: Tensor, log_z: Tensor, draws: int, proposal_temperature: float
) -> Tensor:
    """w_i = (c_i / N)·p(i)/q(i) with q = p^τ / Z_τ, i.e. (c_i / N)·exp((1 − τ)·log p(i) + log Z_τ).

    counts, logprobs [..., K], log_z [...] -> weights [..., K] float32 (0 where the count is 0).
    Unnormalised on purpose: self-normalising them (Σ w = 1) would bias the estimate when τ ≠ 1.
    With τ = 1 this is exactly c_i / N.
    """
    frac = counts.float() / draws
    if proposal_temperature == 1.0:
        return frac
    log_ratio = (1.0 - proposal_temperature) * logprobs.float() + log_z.float()[..., None]
    return torch.where(counts > 0, frac * log_ratio.exp(), frac.new_zeros(()))


# ----------------------------------------------------------------------------------------------------
# losses


def sampled_cross_entropy(
    student_logits: Tensor,
    ids: Tensor,
    weights: Tensor,
    *,
    entropy: Tensor | None = None,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Forward KL from importance-weighted sampled targets: −Σ_i w_i log p_S(i) − H(p_T).

    An unbiased estimate of KL(p_T ‖ p_S) (and of its gradient w.r.t. the student logits) when
    E[w] = p_T, as for `sampled_target`. Without `entropy` the constant H(p_T) is not subtracted and
    the value is the cross-entropy estimate (same gradient; values not comparable with a KL).
    student_logits [..., V], ids / weights [..., K] (padding slots weight 0), entropy [...] or None.
    """
    log_s = temperature_log_probs(student_logits, temperature)
    per_position = -(weights.to(log_s.dtype) * log_s.gather(-1, ids)).sum(-1)
    if entropy is not None:
        per_position = per_position - entropy.to(per_position.dtype)
    return reduce_positions(per_position, mask, reduction)


def bucket_log_probs(
    student_logits: Tensor, ids: Tensor, *, temperature: float = 1.0, valid: Tensor | None = None
) -> Tensor:
    """The student's (K + 1)-bucket distribution: log p_S of each kept id, then of all other ids.

    student_logits [..., V], ids [..., K] (distinct per position among the valid slots);
    valid [..., K] bool or None (all valid): padding slots get no mass (~LOGIT_FLOOR) and their ids
    count as not kept. Returns [..., K + 1] log-probs (finite: an empty tail is ~LOGIT_FLOOR).
    """
    log_s = temperature_log_probs(student_logits, temperature)
    if valid is not None:  # padding slots point at the first slot's id: a repeat changes no bucket
        ids = torch.where(valid, ids, ids[..., :1])
    kept = log_s.gather(-1, ids)
    if valid is not None:
        kept = kept.masked_fill(~valid, LOGIT_FLOOR)
    return torch.cat([kept, _log_mass_outside(log_s, ids)[..., None]], dim=-1)


def topk_divergence(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    *,
    tail_logprob: Tensor | None = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    **divergence_kwargs: Any,
) -> Tensor:
    """Any registered divergence D(p_T, p_S) against a top-k target, with or without its tail.

    tail_logprob [...] given: D between the (K + 1)-bucket coarsenings (kept ids + one tail bucket)
      of teacher and student, with the teacher's log-probs taken as stored. Defined for every
      divergence; biased low (see the module table; reverse KL is the unstable case).
    tail_logprob None: the teacher is renormalised over the kept ids (p̃_T = p_T / Σ_kept p_T, 0
      elsewhere) and D(p̃_T, p_S) is computed exactly against the student's full distribution.
      Divergences that are +inf there (reverse KL, JSD β=1, f=reverse_kl) are refused.
    student_logits [..., V], ids / logprobs [..., K] (distinct ids). Slots whose log-prob is at or
    below LOGIT_FLOOR / 2 are padding (a served teacher that returned fewer than K alternatives):
    they hold no mass on either side.
    """
    if tail_logprob is None:
        _refuse_infinite(divergence, divergence_kwargs)
    valid = logprobs > LOGIT_FLOOR / 2
    student = bucket_log_probs(student_logits, ids, temperature=temperature, valid=valid)
    kept = logprobs.to(student.dtype).masked_fill(~valid, LOGIT_FLOOR)
    if tail_logprob is None:
        kept = kept - torch.logsumexp(kept, dim=-1, keepdim=True)
        tail = torch.full_like(kept[..., :1], LOGIT_FLOOR)
    else:
        tail = tail_logprob.to(student.dtype).clamp_min(LOGIT_FLOOR)[..., None]
    teacher = torch.cat([kept, tail], dim=-1)
    fn = DIVERGENCES.get(divergence)
    return fn(student, teacher, temperature=1.0, mask=mask, reduction=reduction, **divergence_kwargs)


def sparse_divergence(
    student_logits: Tensor,
    ids: Tensor,
    *,
    logprobs: Tensor | None = None,
    weights: Tensor | None = None,
    tail_logprob: Tensor | None = None,
    entropy: Tensor | None = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    **divergence_kwargs: Any,
) -> Tensor:
    """Dispatch on the kind of sparse target: `weights` -> sampled (fkl only), else top-k.

    See `sampled_cross_entropy` and `topk_divergence`; raises ValueError (with the reason) for a
    divergence a target cannot give.
    """
    if weights is not None:
        if DIVERGENCES.canonical(divergence) != "fkl" or divergence_kwargs:
            raise ValueError(
                f"random-sampling targets give an unbiased estimate of forward KL only, not {divergence!r}: "
                "reverse KL, JSD, TVD and the others need the teacher's probability of ids the student "
                "puts mass on, which a sample from the teacher does not contain; use a top-k cache "
                "(with tail) for those"
            )
        return sampled_cross_entropy(
            student_logits,
            ids,
            weights,
            entropy=entropy,
            temperature=temperature,
            mask=mask,
            reduction=reduction,
        )
    if logprobs is None:
        raise ValueError("a top-k target needs logprobs (or weights for a sampled target)")
    return topk_divergence(
        student_logits,
        ids,
        logprobs,
        tail_logprob=tail_logprob,
        divergence=divergence,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        **divergence_kwargs,
    )


# ----------------------------------------------------------------------------------------------------
# helpers


def _log_mass_outside(log_p: Tensor, ids: Tensor) -> Tensor:
    """log Σ_{v ∉ ids} p(v) from log-probs [..., V] and ids [..., K] -> [...] (~LOGIT_FLOOR if empty)."""
    outside = log_p.scatter(-1, ids, LOGIT_FLOOR)
    return torch.logsumexp(outside, dim=-1).clamp_min(LOGIT_FLOOR)


def distribution_entropy(log_p: Tensor) -> Tensor:
    """H(p) in nats over the last dim, from log-probabilities [..., V] -> [...]."""
    return -(log_p.exp() * log_p).sum(-1)


def _refuse_infinite(divergence: str, kwargs: dict[str, Any]) -> None:
    name = DIVERGENCES.canonical(divergence)
    infinite = (
        name == "rkl"
        or (name == "jsd" and float(kwargs.get("beta", 0.5)) == 1.0)
        or (name == "f" and kwargs.get("f") == "reverse_kl")
    )
    if infinite:
        raise ValueError(
            f"{divergence!r} is +inf against a renormalised top-k target (the teacher has no mass outside "
            "the kept ids, the student always has some); store the tail mass (top-k + tail) to use it"
        )


__all__ = [
    "bucket_log_probs",
    "distribution_entropy",
    "importance_weights",
    "sampled_cross_entropy",
    "sampled_target",
    "sparse_divergence",
    "topk_divergence",
    "topk_target",
    "unique_with_counts",
]
