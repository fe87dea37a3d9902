"""Sparse-target distillation losses computed from the student's hidden states, a chunk of tokens at
a time: the student's full [tokens × vocabulary] logits never exist, nor any other [N, V] tensor.

What a logit cache or a served teacher gives (`kdkit.losses.sparse`: top-k ids with log-probs and the
tail mass, or importance-weighted sampled ids) is compared with the student's distribution; the
values are those of `kdkit.losses.sparse.sparse_divergence` on the materialised logits (the same
divergence function is applied to the same (K + 1)-bucket distributions). Per chunk of C counted
tokens: the student's logits [C, V] are projected into a reused buffer, log-softmaxed in place, its
probabilities [C, V] go into a second one; the bucket log-probs [C, K + 1] are gathered, the
divergence and its gradient with respect to the buckets g [C, K + 1] are taken by autograd on those
small tensors, and the gradient with respect to the logits is formed in closed form:

    d L / d z_v = p_S(v)·(−Σ_b g_b) + g_v·[v kept] + g_tail·p_S(v)/P_tail·[v outside the kept ids]

(since d log p_S(u)/d z_v = δ_uv − p_S(v) and d log P_tail / d z_v = p_S(v)/P_tail·[v outside] − p_S(v));
for sampled targets L = −Σ_i w_i log p_S(id_i) − H(p_T), g = −w, no tail. The gradients of the hidden
states and of the head are accumulated chunk by chunk (as in `kdkit.losses.fused`); backward only
scales them. An optional cross-entropy term on the same tokens (temperature 1 only) joins the pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kdkit.losses.divergences import DIVERGENCES, LOGIT_FLOOR
from kdkit.losses.fused import (
    LinearHead,
    LogitTransform,
    _addmm_f32,
    _compute_dtype,
    _log_softmax_,
    _matmul_dtype,
    _mm_f32,
    _project,
    _scaled,
    _workspace,
    auto_chunk_size,
)
from kdkit.losses.sparse import _refuse_infinite


@dataclass(frozen=True)
class _Options:
    divergence: str
    divergence_kwargs: dict[str, Any]
    temperature: float
    chunk_size: int
    transform: LogitTransform
    ce_weight: float
    renormalise: bool  # top-k without its tail: the teacher renormalised over the kept ids
    autocast: torch.dtype | None = None  # autocast's half dtype at the call (set by forward)


class SparseLosses(NamedTuple):
    """`loss` = divergence + ce_weight·ce (differentiable); `divergence`, `ce` detached parts."""

    loss: Tensor
    divergence: Tensor
    ce: Tensor


def fused_sparse_divergence(
    hidden: Tensor,
    head: LinearHead,
    ids: Tensor,
    *,
    logprobs: Tensor | None = None,
    weights: Tensor | None = None,
    tail_logprob: Tensor | None = None,
    entropy: Tensor | None = None,
    mask: Tensor | None = None,
    divergence: str = "fkl",
    temperature: float = 1.0,
    targets: Tensor | None = None,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    **divergence_kwargs: Any,
) -> SparseLosses:
    """Mean over counted positions of D(sparse teacher target, student), from hidden states.

    hidden [..., H] (the student's final normed hidden states at the positions of the target),
    head: the student's `LinearHead` ([V, H] weight); ids [..., K] and logprobs / weights [..., K],
    tail_logprob / entropy [...], mask [...] bool (None: all count) — as for `sparse_divergence`
    (top-k when `weights` is None, else sampled: forward KL only). targets [...] long: label ids for
    a cross-entropy term weighted by `ce_weight` (needs temperature 1). Returns `SparseLosses`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sampled = weights is not None
    if sampled and (DIVERGENCES.canonical(divergence) != "fkl" or divergence_kwargs):
        raise ValueError(
            f"random-sampling targets give an unbiased estimate of forward KL only, not {divergence!r}"
        )
    if not sampled and logprobs is None:
        raise ValueError("a top-k target needs logprobs (or weights for a sampled target)")
    if not sampled and tail_logprob is None:
        _refuse_infinite(divergence, divergence_kwargs)
    if targets is not None and ce_weight and temperature != 1.0:
        raise ValueError("the fused sparse loss folds a cross-entropy term in at temperature 1 only")
    lead = ids.shape[:-1]
    flat_mask = torch.ones(lead, dtype=torch.bool, device=ids.device) if mask is None else mask
    rows = flat_mask.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))

    def pick(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return t.reshape(-1, *t.shape[len(lead) :]).index_select(0, rows.to(t.device)).to(hidden.device)

    vocab = head.weight.shape[0]
    options = _Options(
        divergence=divergence,
        divergence_kwargs=dict(divergence_kwargs),
        temperature=float(temperature),
        chunk_size=int(chunk_size or auto_chunk_size(rows.numel(), vocab, device=hidden.device)),
        transform=head.transform,
        ce_weight=float(ce_weight) if targets is not None else 0.0,
        renormalise=not sampled and tail_logprob is None,
    )
    loss, div, ce = _FusedSparse.apply(
        h,
        head.weight,
        head.bias,
        pick(ids),
        pick(weights if sampled else logprobs),
        pick(tail_logprob),
        pick(entropy),
        pick(targets),
        sampled,
        options,
    )
    return SparseLosses(loss, div, ce)


class _FusedSparse(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ids: Tensor,
        values: Tensor,
        tail: Tensor | None,
        entropy: Tensor | None,
        targets: Tensor | None,
        sampled: bool,
        options: _Options,
    ) -> tuple[Tensor, Tensor, Tensor]:
        device_type = hidden.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # float32 loss; the matmuls in autocast's dtype where the device has that path
            options = replace(options, autocast=torch.get_autocast_dtype(device_type))
            with torch.autocast(device_type, enabled=False):
                return _FusedSparse.forward(
                    ctx, hidden, weight, bias, ids, values, tail, entropy, targets, sampled, options
                )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_any = need_h or need_w or need_b
        dtype = _compute_dtype(hidden.dtype)
        device = hidden.device
        n, vocab = hidden.shape[0], weight.shape[0]
        temperature, transform = options.temperature, options.transform
        fn = DIVERGENCES.get(options.divergence)
        mm_dtype, mode = _matmul_dtype(hidden, weight, dtype, options.autocast)  # half on a GPU
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(dtype)
        floor = b is not None and not bool(torch.isfinite(b).all())
        total = torch.zeros((), dtype=dtype, device=device)
        ce_total = torch.zeros((), dtype=dtype, device=device)
        grad_h = torch.empty((n, hidden.shape[1]), dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=dtype, device=device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=device) if need_b else None
        scale = 1.0 / max(n, 1)  # the mean over counted positions
        want_slope = need_any and transform.softcap is not None
        chunk = max(1, options.chunk_size)
        work = _workspace(max(1, min(chunk, n)), vocab, dtype, device)
        arange = torch.arange(min(chunk, max(n, 1)), device=device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            buffers = work.take(2 + int(want_slope), stop - start)
            h_chunk = hidden[start:stop].to(mm_dtype)
            with torch.no_grad():
                slope = _project(
                    h_chunk, w, b, transform, temperature, buffers[0], buffers[2] if want_slope else None
                )
                log_s = _log_softmax_(buffers[0], floor)  # [C, V], at the distillation temperature
                p = torch.exp(log_s, out=buffers[1])
                chunk_ids = ids[start:stop]
                if sampled:
                    wts = values[start:stop].to(dtype)
                    value = -(wts * log_s.gather(-1, chunk_ids)).sum()
                    if entropy is not None:
                        value = value - entropy[start:stop].to(dtype).sum()
                    g_sum = -wts.sum(-1)  # Σ_b g_b with g = −w
                    grad = p.mul_(-g_sum[:, None])
                    grad.scatter_add_(-1, chunk_ids, -wts)
                else:
                    value, grad = _topk_chunk(
                        log_s,
                        p,
                        chunk_ids,
                        values[start:stop],
                        None if tail is None else tail[start:stop],
                        fn,
                        options,
                        need_any,
                    )
                if targets is not None:
                    at = arange[: stop - start]
                    t_ids = targets[start:stop]
                    ce_total -= log_s[at, t_ids].sum()  # temperature 1 (checked by the caller)
                    if need_any and options.ce_weight:
                        grad.add_(p_ce := torch.exp(log_s), alpha=options.ce_weight)
                        del p_ce
                        grad[at, t_ids] -= options.ce_weight
                total += value
                if not need_any:
                    continue
                if slope is not None:
                    grad.mul_(slope)
                alpha = transform.scale * scale / temperature
                if grad_b is not None:
                    grad_b.add_(grad.sum(0), alpha=alpha)
                g_mm = grad if mm_dtype == dtype else grad.to(mm_dtype)
                if grad_h is not None:
                    _mm_f32(g_mm, w, grad_h[start:stop])
                    grad_h[start:stop].mul_(alpha)
                if grad_w is not None:
                    _addmm_f32(grad_w, g_mm.t(), h_chunk, beta=1.0, alpha=alpha, mode=mode)
                del g_mm
        total *= scale
        ce_total *= scale
        ctx.grads = [
            None if g is None else g.to(ref.dtype)
            for g, ref in ((grad_h, hidden), (grad_w, weight), (grad_b, bias))
        ]
        loss = total + options.ce_weight * ce_total
        parts = total.detach().to(hidden.dtype), ce_total.detach().to(hidden.dtype)
        ctx.mark_non_differentiable(*parts)
        return loss.to(hidden.dtype), *parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor, *_parts: Any) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("fused_sparse_divergence: its gradients were already used by a backward")
        grads, ctx.grads = ctx.grads, None
        return (*_scaled(grads, grad_output), None, None, None, None, None, None, None)


def _topk_chunk(
    log_s: Tensor,
    p: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    tail: Tensor | None,
    fn: Any,
    options: _Options,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(divergence summed over the chunk, d/d(logits at temperature) [C, V] in `p`'s buffer).

    The buckets are those of `kdkit.losses.sparse.topk_divergence`: kept ids (padding slots, log-prob
    ≤ LOGIT_FLOOR / 2, hold no mass and point at the first slot's id), then everything else.
    """
    dtype = log_s.dtype
    valid = logprobs > LOGIT_FLOOR / 2
    ids = torch.where(valid, ids, ids[..., :1])
    kept_p = p.gather(-1, ids)
    kept_s = log_s.gather(-1, ids).masked_fill(~valid, LOGIT_FLOOR)
    p.scatter_(-1, ids, 0.0)  # p now holds the student's mass outside the kept ids
    outside = p.sum(-1)  # [C]: summed directly, no 1 − Σ kept cancellation
    tail_s = outside.log().clamp_min(LOGIT_FLOOR)
    kept_t = logprobs.to(dtype).masked_fill(~valid, LOGIT_FLOOR)
    if options.renormalise:
        kept_t = kept_t - torch.logsumexp(kept_t, dim=-1, keepdim=True)
        tail_t = torch.full_like(kept_t[..., :1], LOGIT_FLOOR)
    else:
        assert tail is not None
        tail_t = tail.to(dtype).clamp_min(LOGIT_FLOOR)[..., None]
    student = torch.cat([kept_s, tail_s[..., None]], dim=-1).requires_grad_(need_grad)
    teacher = torch.cat([kept_t, tail_t], dim=-1)
    with torch.enable_grad():
        value = fn(student, teacher, temperature=1.0, reduction="sum", **options.divergence_kwargs)
    if not need_grad:
        return value.detach(), p
    (g,) = torch.autograd.grad(value, student)
    g_kept = g[..., :-1].masked_fill(~valid, 0.0)
    g_tail = g[..., -1].masked_fill(outside <= 0, 0.0)  # clamped at the floor: no gradient
    g_sum = g_kept.sum(-1) + g_tail
    # outside the kept ids: p_S(v)·(g_tail / P_tail − Σ g); at kept ids: p_S(v)·(−Σ g) + g_v
    ratio = torch.where(outside > 0, g_tail / outside.clamp_min(torch.finfo(dtype).tiny), 0.0)
    grad = p.mul_((ratio - g_sum)[:, None])
    grad.scatter_add_(-1, ids, torch.where(valid, kept_p * -g_sum[:, None] + g_kept, 0.0))
    return value.detach(), grad


__all__ = ["SparseLosses", "fused_sparse_divergence"]
