"""Fused, chunked large-vocabulary distillation loss.

The divergence between teacher and student token distributions is computed from the two
models' final hidden states and output-projection (LM head) weights, a chunk of tokens at a
time, so the full [tokens x vocab] logits of both models never exist at once. The student's
gradients (hidden states, weight, bias) are computed chunk by chunk inside the forward pass and
accumulated; backward only scales them by the incoming gradient. This is the design of
Liger-Kernel's fused linear distillation losses, in plain torch (runs on CPU and GPU).

Memory: one chunk's logits of each model plus the divergence's intermediates, instead of the
whole sequence's (fkl, rkl and jsd have closed-form chunk gradients, computed in place without
an autograd graph; other divergences use local autograd on the chunk); plus float32 gradient
accumulators of the student's hidden states [N, H_S] and weight [V, H_S]. Any divergence of
`DIVERGENCES` (or any callable with its signature) works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdkit.losses.divergences import DIVERGENCES, LOGIT_FLOOR, forward_kl, generalized_jsd, reverse_kl

# Default budget for one chunk's float32 logits of one model. With the closed-form divergences
# (fkl, rkl, jsd) a chunk's working set is ~6x this, i.e. ~0.8 GB, under a quarter of the unfused
# loss from 1k tokens at a 150k vocabulary (measured: 0.76 GB at V = 49,152, N = 2,048 and 1.23 GB
# at V = 151,936, N = 1,024, vs 4.6-5.9 and 7.1 GB unfused). Larger chunks read the [V, H] weights
# fewer times: 128 MiB was ~15% faster than 64 MiB on CPU (docs/benchmarks/loss_memory.md).
DEFAULT_CHUNK_BYTES = 128 * 2**20

DivergenceFn = Callable[..., Tensor]


def auto_chunk_size(n_tokens: int, vocab_size: int, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's float32 logits [chunk, V] take about `chunk_bytes`.

    Returns an int in [1, max(n_tokens, 1)]; rounded down to a multiple of 8 when above 8.
    """
    tokens = max(1, chunk_bytes // (4 * max(vocab_size, 1)))
    if tokens > 8:
        tokens -= tokens % 8  # friendlier matmul shapes
    return max(1, min(tokens, max(n_tokens, 1)))


def _resolve(divergence: str | DivergenceFn) -> DivergenceFn:
    return DIVERGENCES.get(divergence) if isinstance(divergence, str) else divergence


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least (bf16/fp16 logits lose the small probabilities a divergence depends on);
    # float64 stays float64 so the loss can be gradchecked.
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# Post-head logit transforms (Cohere's logit_scale, Granite's 1/logits_scaling, Gemma 2's soft-cap)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its raw head output z = h·Wᵀ + b before the softmax.

    z' = softcap · tanh(scale · z / softcap), or z' = scale · z when softcap is None. Identity by
    default. (Cohere: scale = logit_scale; Granite: scale = 1 / logits_scaling; Gemma 2/3:
    softcap = final_logit_softcapping. `kdkit.models.heads.head_transform` reads it off a model.)
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not (self.scale > 0 and self.scale < float("inf")):
            raise ValueError(f"LogitTransform.scale must be a finite number > 0, got {self.scale}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"LogitTransform.softcap must be > 0 or None, got {self.softcap}")

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: Tensor) -> Tensor:
        """[..., V] raw logits -> [..., V] transformed logits (differentiable, not in place)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


IDENTITY = LogitTransform()


@dataclass(frozen=True)
class LinearHead:
    """A model's output projection as the fused loss needs it: logits = transform(h·Wᵀ + b).

    weight: [V, H]; bias: [V] or None; transform: the post-head map (identity for most models).
    """

    weight: Tensor
    bias: Tensor | None = None
    transform: LogitTransform = IDENTITY

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., H] -> [..., V]: the model's logits, materialised (the unfused reference)."""
        return self.transform(nn.functional.linear(hidden, self.weight, self.bias))


def _transform_(logits: Tensor, transform: LogitTransform, keep_slope: bool) -> tuple[Tensor, Tensor | None]:
    """Apply `transform` to a chunk's raw logits [C, V], in place where possible.

    Returns (transformed logits, slope) where slope [C, V] = dz'/dz (only for a soft-cap with
    keep_slope; a pure scale's slope is the constant `transform.scale`, applied by the caller).
    """
    if transform.scale != 1.0:
        logits.mul_(transform.scale)
    if transform.softcap is None:
        return logits, None
    cap = transform.softcap
    tanh = logits.div_(cap).tanh_()
    if not keep_slope:
        return tanh.mul_(cap), None
    capped = tanh * cap
    # d/dz [c·tanh(s·z/c)] = s·(1 − tanh²)
    slope = tanh.square_().neg_().add_(1.0)
    if transform.scale != 1.0:
        slope.mul_(transform.scale)
    return capped, slope


# ----------------------------------------------------------------------------------------------
# Closed-form value and student-logit gradient of the common divergences, in place.
#
# Autograd through a divergence's elementwise graph was ~60% of a fused step (measured: V = 49,152,
# N = 2,048, H = 576, jsd) and keeps ~12-16 [C, V] intermediates alive. The formulas below give the
# same value and d(sum)/d(student logits) with ~5 [C, V] buffers and no graph. They mirror
# `kdkit.losses.divergences` (same clamping, same stable mixture) so results agree to float rounding.
#
# Each form also takes `ce`: a cross-entropy weight w at temperature 1 (0 = none); it adds w·p_S to
# the gradient (the softmax part of d CE / d logits; the caller subtracts w at the target ids), so a
# CE term on the same tokens costs no extra pass over the chunk.


def _log_softmax_(logits: Tensor, temperature: float) -> Tensor:
    """In place: logits [C, V] -> log softmax(logits / T) over V, as `temperature_log_probs`."""
    if temperature != 1.0:
        logits.div_(temperature)
    logits.clamp_min_(LOGIT_FLOOR)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _forward_kl_closed(
    log_s: Tensor, log_t: Tensor, temperature: float, ce: float = 0.0
) -> tuple[Tensor, Tensor]:
    """KL(p_T ‖ p_S) summed over the chunk; d/d(student logits) = (p_S − p_T) / T."""
    p_t = log_t.exp()
    value = (p_t * (log_t - log_s)).sum()
    p_s = log_s.exp_()  # log_s is consumed
    if ce:
        grad = p_s.mul_(1.0 + ce * temperature).sub_(p_t).div_(temperature)
    else:
        grad = p_s.sub_(p_t).div_(temperature)
    return value, grad


def _reverse_kl_closed(
    log_s: Tensor, log_t: Tensor, temperature: float, ce: float = 0.0
) -> tuple[Tensor, Tensor]:
    """KL(p_S ‖ p_T) summed; d/dp_S = log p_S − log p_T (+1, which the softmax Jacobian cancels)."""
    diff = log_s - log_t
    p_s = log_s.exp_()  # log_s is consumed
    per_token = (p_s * diff).sum(-1, keepdim=True)
    value = per_token.sum()
    diff.sub_(per_token)
    if ce:
        diff.add_(ce * temperature)
    grad = diff.mul_(p_s).div_(temperature)
    return value, grad


def _jsd_closed(
    log_s: Tensor, log_t: Tensor, temperature: float, beta: float, ce: float = 0.0
) -> tuple[Tensor, Tensor]:
    """β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M), M = β·p_T + (1−β)·p_S, summed over the chunk.

    d/dp_S of the sum is (1−β)·(log p_S − log M) + const (the p_T/M and p_S/M terms add up to 1).
    """
    if beta == 0.0:
        return _forward_kl_closed(log_s, log_t, temperature, ce)
    if beta == 1.0:
        return _reverse_kl_closed(log_s, log_t, temperature, ce)
    # log M as in `_log_mix`: shifted by max(log p_S, log p_T) so p_S = p_T gives exactly log p_S.
    shift = torch.maximum(log_s, log_t)
    log_m = torch.sub(log_t, shift).exp_().mul_(beta)
    log_m.add_(torch.sub(log_s, shift).exp_(), alpha=1.0 - beta).log_().add_(shift)
    del shift
    p_t = log_t.exp()
    teacher_term = p_t.mul_(log_t.sub_(log_m)).sum()  # log_t is consumed
    del p_t
    diff = torch.sub(log_s, log_m, out=log_m)  # log p_S − log M, in log_m's buffer
    p_s = log_s.exp_()  # log_s is consumed
    kl_s = (p_s * diff).sum(-1, keepdim=True)  # KL(p_S ‖ M) per token [C, 1]
    value = beta * teacher_term + (1.0 - beta) * kl_s.sum()
    diff.sub_(kl_s).mul_(1.0 - beta)
    if ce:
        diff.add_(ce * temperature)
    grad = diff.mul_(p_s).div_(temperature)
    return value, grad


_CLOSED_FORMS: dict[Callable[..., Tensor], tuple[Callable[..., tuple[Tensor, Tensor]], frozenset[str]]] = {
    forward_kl: (_forward_kl_closed, frozenset()),
    reverse_kl: (_reverse_kl_closed, frozenset()),
    generalized_jsd: (_jsd_closed, frozenset({"beta"})),
}


def _closed_form(
    fn: DivergenceFn, divergence_kwargs: dict[str, Any]
) -> tuple[Callable[..., Any], dict] | None:
    """(closed form, its kwargs) for `fn`, or None when it has none (then local autograd is used)."""
    # By identity, not a dict lookup: a user's callable need not be hashable.
    closed = next((form for known, form in _CLOSED_FORMS.items() if known is fn), None)
    if closed is None or not set(divergence_kwargs) <= closed[1]:
        return None
    form, _ = closed
    if form is _jsd_closed:
        beta = float(divergence_kwargs.get("beta", 0.5))
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        return form, {"beta": beta}
    return form, {}


def _chunk_terms(
    fn: DivergenceFn,
    closed: tuple[Callable[..., Any], dict] | None,
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float,
    divergence_kwargs: dict[str, Any],
    need_grad: bool,
    targets: Tensor | None,
    ce_weight: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(divergence summed over the chunk, CE summed or None, d(div + w·CE)/d(student logits) [C, V] or None).

    logits_s, logits_t: [C, V] (transformed) logits, consumed (overwritten). targets: [C] ids for
    the cross-entropy at temperature 1 (None = no CE term); ce_weight: its weight in the gradient.
    Uses the closed form where one exists for `fn`, else local autograd on this chunk only.
    """
    ce_value: Tensor | None = None
    ce_grad: Tensor | None = None
    rows = None
    fold_ce = closed is not None and temperature == 1.0  # CE's softmax part joins the closed form
    if targets is not None:
        rows = torch.arange(targets.shape[0], device=targets.device)
        if not fold_ce:  # its own log-softmax at temperature 1, before the logits are consumed
            log_ce = torch.log_softmax(logits_s, dim=-1)
            ce_value = -log_ce[rows, targets].sum()
            if need_grad and ce_weight:
                ce_grad = log_ce.exp_()
                ce_grad[rows, targets] -= 1.0
            del log_ce
    if closed is not None:
        form, kwargs = closed
        log_s = _log_softmax_(logits_s, temperature)
        if targets is not None and fold_ce:
            ce_value = -log_s[rows, targets].sum()
        log_t = _log_softmax_(logits_t, temperature)
        w = ce_weight if (fold_ce and targets is not None and need_grad) else 0.0
        value, grad = form(log_s, log_t, temperature, **kwargs, ce=w)
        if w:
            grad[rows, targets] -= w
        if not need_grad:
            return value, ce_value, None
    elif not need_grad:
        with torch.no_grad():
            value = fn(logits_s, logits_t, temperature=temperature, reduction="sum", **divergence_kwargs)
        return value, ce_value, None
    else:
        logits_s.requires_grad_(True)
        with torch.enable_grad():
            value = fn(logits_s, logits_t, temperature=temperature, reduction="sum", **divergence_kwargs)
            (grad,) = torch.autograd.grad(value, logits_s)  # [C, V]
        value = value.detach()
    if ce_grad is not None:
        grad.add_(ce_grad, alpha=ce_weight)
    return value, ce_value, grad


class _FusedLinearDivergence(torch.autograd.Function):
    """Chunked forward that also produces the student's gradients; backward rescales them.

    Inputs are already flattened: student_hidden [N, H_S], student_weight [V, H_S],
    teacher_hidden [N, H_T], teacher_weight [V, H_T] (already sliced to the student's V),
    mask [N] bool or None, targets [N] long or None (CE ids). Returns (loss, divergence, ce): the
    scalar divergence + ce_weight·CE, and its two parts detached (ce is 0 without targets); each is
    a sum (reduction "sum") or divided by the number of counted tokens (reduction "mean").
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_hidden: Tensor,
        student_weight: Tensor,
        student_bias: Tensor | None,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
        mask: Tensor | None,
        targets: Tensor | None,
        options: _Options,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # Autocast (mixed_precision bf16/fp16) would run the chunk matmuls in half precision and
        # then refuse the float32 `out=` buffers: the loss is computed in float32 regardless.
        device_type = student_hidden.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return _FusedLinearDivergence.forward(
                    ctx,
                    student_hidden,
                    student_weight,
                    student_bias,
                    teacher_hidden,
                    teacher_weight,
                    teacher_bias,
                    mask,
                    targets,
                    options,
                )
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b
        dtype = _compute_dtype(student_hidden.dtype)
        n_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
        device = student_hidden.device
        fn, temperature, chunk_size = options.fn, options.temperature, options.chunk_size
        s_transform, t_transform, ce_weight = (
            options.student_transform,
            options.teacher_transform,
            options.ce_weight,
        )
        closed = _closed_form(fn, options.divergence_kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")

        # Only counted tokens are computed: padding and prompt tokens cost nothing. A chunk is
        # then always fully counted, so the divergence gets mask=None.
        rows = mask.nonzero().squeeze(1) if mask is not None else None
        h_s = student_hidden if rows is None else student_hidden.index_select(0, rows)
        h_t = teacher_hidden if rows is None else teacher_hidden.index_select(0, rows)
        ids = None if targets is None or rows is None else targets.index_select(0, rows)
        ids = targets if rows is None else ids
        n_counted = h_s.shape[0]
        if ids is not None and n_counted and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"fused cross-entropy: every counted token needs a target id in [0, {vocab}), got "
                f"ids from {int(ids.min())} to {int(ids.max())} (mask the positions labelled -100)"
            )

        # Weights are cast once, not per chunk (a no-op when they are already float32).
        w_s = student_weight.to(dtype)
        w_t = teacher_weight.to(dtype)
        b_s = None if student_bias is None else student_bias.to(dtype)
        b_t = None if teacher_bias is None else teacher_bias.to(dtype)

        total = torch.zeros((), dtype=dtype, device=device)
        ce_total = torch.zeros((), dtype=dtype, device=device)
        grad_h = torch.zeros((n_counted, h_s.shape[1]), dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros_like(w_s) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=device) if need_b else None

        for start in range(0, n_counted, chunk_size):
            stop = min(start + chunk_size, n_counted)
            h_s_chunk = h_s[start:stop].to(dtype)
            with torch.no_grad():
                logits_t = nn.functional.linear(h_t[start:stop].to(dtype), w_t, b_t)  # [C, V]
                logits_s = nn.functional.linear(h_s_chunk, w_s, b_s)  # [C, V]
                logits_t, _ = _transform_(logits_t, t_transform, keep_slope=False)
                logits_s, slope = _transform_(logits_s, s_transform, keep_slope=need_any)
            value, ce_value, grad_logits = _chunk_terms(
                fn,
                closed,
                logits_s,
                logits_t,
                temperature,
                options.divergence_kwargs,
                need_any,
                None if ids is None else ids[start:stop],
                ce_weight,
            )
            del logits_s, logits_t
            total += value
            if ce_value is not None:
                ce_total += ce_value
            if grad_logits is None:
                continue
            # Back through the transform: d/dz = dz'/dz · d/dz'.
            if slope is not None:
                grad_logits.mul_(slope)
                del slope
            elif s_transform.scale != 1.0:
                grad_logits.mul_(s_transform.scale)
            if grad_h is not None:
                torch.mm(grad_logits, w_s, out=grad_h[start:stop])  # [C, H_S]
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), h_s_chunk)  # in place: no [V, H_S] temporary per chunk
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            del grad_logits, value

        scale = 1.0 / max(n_counted, 1) if options.reduction == "mean" else 1.0
        if scale != 1.0:
            total *= scale
            ce_total *= scale
            for grad in (grad_h, grad_w, grad_b):
                if grad is not None:
                    grad.mul_(scale)

        if grad_h is not None and rows is not None:
            # Uncounted tokens get exactly zero gradient.
            full = torch.zeros((n_tokens, grad_h.shape[1]), dtype=dtype, device=device)
            grad_h = full.index_copy_(0, rows, grad_h)
        # Plain attributes, not save_for_backward: backward hands them over and drops its own
        # reference, so autograd adopts them as .grad instead of copying another [V, H_S].
        ctx.grads = [
            None if grad is None else grad.to(ref.dtype)
            for grad, ref in ((grad_h, student_hidden), (grad_w, student_weight), (grad_b, student_bias))
        ]
        out_dtype = student_hidden.dtype
        loss = (total + ce_weight * ce_total) if ids is not None else total
        parts = total.detach().to(out_dtype), ce_total.detach().to(out_dtype)
        ctx.mark_non_differentiable(*parts)
        return loss.to(out_dtype), *parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor, *_parts: Any) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("fused_linear_divergence: its gradients were already used by a backward")
        grads, ctx.grads = ctx.grads, None
        # grad_output is 1.0 in the usual loss.backward(); skip the multiply (and its copy) then.
        unit = torch.equal(grad_output, torch.ones_like(grad_output))
        grad_h, grad_w, grad_b = (g if g is None or unit else g * grad_output for g in grads)
        del grads
        # Teacher tensors, mask, targets and the settings never get a gradient.
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


@dataclass(frozen=True)
class _Options:
    fn: DivergenceFn
    temperature: float
    reduction: str
    chunk_size: int
    divergence_kwargs: dict[str, Any]
    student_transform: LogitTransform
    teacher_transform: LogitTransform
    ce_weight: float


class FusedLosses(NamedTuple):
    """The fused loss and its parts: `loss` = divergence + ce_weight·ce (differentiable);
    `divergence` and `ce` are detached values for logging (ce is 0 without targets)."""

    loss: Tensor
    divergence: Tensor
    ce: Tensor


def _fused(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str | DivergenceFn,
    temperature: float,
    mask: Tensor | None,
    reduction: str,
    chunk_size: int | None,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    student_transform: LogitTransform | None,
    teacher_transform: LogitTransform | None,
    targets: Tensor | None,
    ce_weight: float,
    divergence_kwargs: dict[str, Any],
) -> FusedLosses:
    name = "fused_linear_divergence"
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"{name}: reduction must be 'mean' or 'sum', got {reduction!r} "
            "(per-token values would need the per-token gradients the fused loss never keeps)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"{name}: student hidden states {tuple(student_hidden.shape)} and "
            f"teacher hidden states {tuple(teacher_hidden.shape)} differ in their leading dims"
        )
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"{name}: student weight {tuple(student_weight.shape)} is not [V, {student_hidden.shape[-1]}]"
        )
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"{name}: teacher weight {tuple(teacher_weight.shape)} is not [V_T, {teacher_hidden.shape[-1]}]"
        )
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] < vocab:
        raise ValueError(
            f"{name}: the teacher's vocabulary ({teacher_weight.shape[0]}) is "
            f"smaller than the student's ({vocab}); only a padded teacher vocabulary works"
        )
    # Same tokenizer, padded teacher head: its extra rows are not tokens. Views, no copy.
    teacher_weight = teacher_weight[:vocab]
    if teacher_bias is not None:
        teacher_bias = teacher_bias[:vocab]

    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    flat_mask = None
    if mask is not None:
        if mask.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"{name}: mask {tuple(mask.shape)} does not match the hidden "
                f"states' leading dims {tuple(student_hidden.shape[:-1])}"
            )
        flat_mask = mask.reshape(-1).to(device=h_s.device, dtype=torch.bool)
    flat_targets = None
    if targets is not None:
        if targets.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"{name}: targets {tuple(targets.shape)} do not match the hidden "
                f"states' leading dims {tuple(student_hidden.shape[:-1])}"
            )
        flat_targets = targets.reshape(-1).to(device=h_s.device, dtype=torch.long)
    elif ce_weight:
        raise ValueError(f"{name}: ce_weight={ce_weight} needs the target ids (targets=...)")
    if chunk_size is None:
        chunk_size = auto_chunk_size(h_s.shape[0], vocab)
    if chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")

    options = _Options(
        fn=_resolve(divergence),
        temperature=float(temperature),
        reduction=reduction,
        chunk_size=int(chunk_size),
        divergence_kwargs=divergence_kwargs,
        student_transform=student_transform or IDENTITY,
        teacher_transform=teacher_transform or IDENTITY,
        ce_weight=float(ce_weight),
    )
    loss, div, ce = _FusedLinearDivergence.apply(
        h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, flat_mask, flat_targets, options
    )
    return FusedLosses(loss, div, ce)


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    divergence: str | DivergenceFn = "jsd",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_transform: LogitTransform | None = None,
    teacher_transform: LogitTransform | None = None,
    targets: Tensor | None = None,
    ce_weight: float = 0.0,
    **divergence_kwargs: Any,
) -> Tensor:
    """Divergence between teacher and student token distributions, from hidden states, in chunks.

    Equals `DIVERGENCES.get(divergence)(z_S, z_T, temperature=..., mask=mask, reduction=reduction,
    **divergence_kwargs)` with z = transform(h @ Wᵀ + b) for each model, in value and in the
    gradients to the student's hidden states, weight and bias, without materialising the [N, V]
    logits of either model: at most `chunk_size` tokens' logits exist at a time. Teacher tensors
    never get a gradient (the teacher side runs under no_grad).

    student_hidden: [..., H_S] final hidden states (after the final norm), any leading dims
    student_weight: [V, H_S] output projection (LM head); student_bias: [V] or None
    teacher_hidden: [..., H_T] with the same leading dims; teacher_weight: [V_T, H_T]; teacher_bias: [V_T]
    student_transform, teacher_transform: each model's post-head `LogitTransform` (Cohere's
        logit scale, Granite's logits scaling, Gemma 2's final soft-cap); None = identity
    mask: [...] bool, True = the token counts (e.g. `labels != -100`); None = all count
    targets, ce_weight: [...] long token ids: adds ce_weight · cross-entropy(z_S at temperature 1,
        targets) over the same counted tokens, computed in the same chunk pass (no second
        projection of the student). Every counted token needs an id in [0, V).
    divergence: a name in `DIVERGENCES` ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "f") or a callable
        with the same signature; `divergence_kwargs` (beta, alpha, ...) are passed to it
    temperature: softmax temperature of both models (no T^2 factor is applied)
    reduction: "mean" (sum over counted tokens / number of counted tokens, over ALL chunks; 0 when
        none count) or "sum". "none" is not supported: per-token gradients are not kept.
    chunk_size: tokens per chunk; None picks it so one chunk's float32 logits take ~128 MiB
        (`auto_chunk_size`), e.g. 680 tokens at V = 49,152 and 216 at V = 151,936.

    Vocabulary padding: a teacher with V_T > V (same tokenizer, embedding padded to a multiple
    of 64/128, as Qwen's 151,936 vs 152,064) is cut to the student's first V rows; the padded
    rows are not real tokens. A teacher with V_T < V is an error.
    Dtypes: each chunk is computed in float32 (float64 stays float64) even for bf16/fp16 inputs
    and under autocast; the loss comes back in the student hidden states' dtype, gradients in
    each input's. Returns a scalar tensor (use `fused_head_losses` for the parts separately).
    """
    return _fused(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        divergence=divergence,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        student_transform=student_transform,
        teacher_transform=teacher_transform,
        targets=targets,
        ce_weight=ce_weight,
        divergence_kwargs=divergence_kwargs,
    ).loss


def fused_head_losses(
    student_hidden: Tensor,
    student_head: LinearHead,
    teacher_hidden: Tensor,
    teacher_head: LinearHead,
    *,
    divergence: str | DivergenceFn = "jsd",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    targets: Tensor | None = None,
    ce_weight: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    **divergence_kwargs: Any,
) -> FusedLosses:
    """`fused_linear_divergence` on two `LinearHead`s, returning (loss, divergence, ce).

    student_hidden: [..., H_S]; teacher_hidden: [..., H_T]; mask, targets: [...] (see
    `fused_linear_divergence`). loss = divergence + ce_weight·ce carries the gradients;
    `divergence` and `ce` (0 without targets) are detached values of the two parts.
    """
    return _fused(
        student_hidden,
        student_head.weight,
        teacher_hidden,
        teacher_head.weight,
        divergence=divergence,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
        student_bias=student_head.bias,
        teacher_bias=teacher_head.bias,
        student_transform=student_head.transform,
        teacher_transform=teacher_head.transform,
        targets=targets,
        ce_weight=ce_weight,
        divergence_kwargs=divergence_kwargs,
    )


def fused_causal_lm_losses(
    student_hidden: Tensor,
    student_head: LinearHead,
    teacher_hidden: Tensor,
    teacher_head: LinearHead,
    labels: Tensor,
    *,
    divergence: str | DivergenceFn = "jsd",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    **divergence_kwargs: Any,
) -> FusedLosses:
    """The fused KD (+ optional CE) loss of a causal LM batch, in one call.

    student_hidden [B, T, H_S], teacher_hidden [B, T, H_T]: final hidden states of the same
    input ids; labels [B, T] with -100 on positions not trained (prompt, padding). Position t
    predicts labels[:, t + 1]; the loss is the mean over the tokens trained on. The CE term
    (ce_weight > 0) uses the labels as targets on the same tokens; its value is always reported.
    """
    targets = labels[:, 1:]
    mask = targets != -100
    return fused_head_losses(
        student_hidden[:, :-1],
        student_head,
        teacher_hidden[:, :-1],
        teacher_head,
        divergence=divergence,
        temperature=temperature,
        mask=mask,
        targets=targets.clamp_min(0),
        ce_weight=ce_weight,
        reduction="mean",
        chunk_size=chunk_size,
        **divergence_kwargs,
    )


class FusedLinearDivergence(nn.Module):
    """`fused_linear_divergence` with its settings fixed at construction (Liger/TRL style).

    >>> loss_fn = FusedLinearDivergence("jsd", temperature=1.0, beta=0.5)
    >>> loss = loss_fn(h_student, student.lm_head.weight, h_teacher, teacher.lm_head.weight,
    ...                mask=labels != -100)
    """

    def __init__(
        self,
        divergence: str | DivergenceFn = "jsd",
        temperature: float = 1.0,
        chunk_size: int | None = None,
        reduction: str = "mean",
        **divergence_kwargs: Any,
    ) -> None:
        super().__init__()
        self.fn = _resolve(divergence)  # fail at construction on an unknown name, not at step 1
        self.divergence = divergence
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.reduction = reduction
        self.divergence_kwargs = divergence_kwargs

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        mask: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        """Shapes as in `fused_linear_divergence`; returns a scalar."""
        return fused_linear_divergence(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            divergence=self.fn,
            temperature=self.temperature,
            mask=mask,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            **self.divergence_kwargs,
        )

    def extra_repr(self) -> str:
        name = self.divergence
        if not isinstance(name, str):
            name = getattr(name, "__name__", "?")
        return (
            f"divergence={name!r}, temperature={self.temperature}, chunk_size={self.chunk_size}, "
            f"reduction={self.reduction!r}, {self.divergence_kwargs}"
        )


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FusedLinearDivergence",
    "FusedLosses",
    "LinearHead",
    "LogitTransform",
    "auto_chunk_size",
    "fused_causal_lm_losses",
    "fused_head_losses",
    "fused_linear_divergence",
]
