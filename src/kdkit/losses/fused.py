"""Fused, chunked large-vocabulary distillation loss.

The divergence between teacher and student token distributions is computed from the two
models' final hidden states and output-projection (LM head) weights, a chunk of tokens at a
time, so the full [tokens x vocab] logits of both models never exist at once. The student's
gradients (hidden states, weight, bias) are computed chunk by chunk inside the forward pass and
accumulated; backward only scales them by the incoming gradient. This is the design of
Liger-Kernel's fused linear distillation losses, in plain torch (runs on CPU and GPU).

Memory: one chunk's logits of each model plus the divergence's intermediates, instead of the
whole sequence's (fkl, rkl and jsd have closed-form chunk gradients, computed in place in a few
reused [chunk, V] buffers without an autograd graph; other divergences use local autograd on the
chunk); plus float32 gradient accumulators of the student's hidden states [N, H_S] and weight
[V, H_S]. On CPU the chunk buffers (~100-220 MiB at the default chunk size) are kept between calls
so that no step pays page faults for them again (`release_workspace` frees them). Under autocast
the loss still computes in float32. Optionally a cross-entropy term on the same tokens (targets,
ce_weight) and each model's post-head logit transform (scale, soft-cap) are applied in the same
chunk pass. Any divergence of
`DIVERGENCES` (or any callable with its signature) works.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from kdkit.losses.divergences import DIVERGENCES, LOGIT_FLOOR, forward_kl, generalized_jsd, reverse_kl

# Default budget for one chunk's float32 logits of one model ([chunk, V] x 4 bytes). On CPU the
# chunk buffers are kept between calls (see `_Workspace`), so small chunks cost no page faults and
# keep the kept memory small: 32 MiB per buffer, ~5-7 buffers (fkl/rkl 3, jsd 5, +1 for a soft-cap,
# +1 for a CE term at T != 1), i.e. 96-224 MiB, plus the [V, H] gradient. Measured side by side on
# the loaded 2-core CPU (jsd, one thread): 160-token chunks 1.11-1.27x the matmul floor vs 1.2-1.4x
# for 680 at V = 49,152, H = 576. At V = 151,936, H = 1,024 the 48 tokens of 32 MiB were ~10-20%
# slower than 192-216-token chunks (each BLAS call packs the [V, H] weight): at least 128 tokens.
# On GPU the caching allocator reuses memory and larger matmuls
# pay off: 128 MiB (the earlier CPU default; not re-measured on a GPU).
DEFAULT_CHUNK_BYTES = 32 * 2**20
MIN_CPU_CHUNK_TOKENS = 128
ACCELERATOR_CHUNK_BYTES = 128 * 2**20

DivergenceFn = Callable[..., Tensor]


def auto_chunk_size(
    n_tokens: int,
    vocab_size: int,
    *,
    chunk_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Tokens per chunk so that one chunk's float32 logits [chunk, V] take about `chunk_bytes`.

    chunk_bytes: None = `DEFAULT_CHUNK_BYTES` on CPU (or no device given) but at least
    `MIN_CPU_CHUNK_TOKENS` tokens (a BLAS matmul packs the [V, H] weight once per call, so very few
    rows per call waste that work at large V), `ACCELERATOR_CHUNK_BYTES` on any other device.
    Returns an int in [1, max(n_tokens, 1)]; a multiple of 8 when above 8.
    """
    minimum = 1
    if chunk_bytes is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        chunk_bytes = DEFAULT_CHUNK_BYTES if on_cpu else ACCELERATOR_CHUNK_BYTES
        minimum = MIN_CPU_CHUNK_TOKENS if on_cpu else 1
    tokens = max(minimum, chunk_bytes // (4 * max(vocab_size, 1)))
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


# ----------------------------------------------------------------------------------------------
# Closed-form value and student-logit gradient of the common divergences, in place.
#
# Autograd through a divergence's elementwise graph was ~60% of a fused step (measured: V = 49,152,
# N = 2,048, H = 576, jsd) and keeps ~12-16 [C, V] intermediates alive. The formulas below give the
# same value and d(sum)/d(student logits) = c·G with a few [C, V] buffers and no graph. Every
# [C, V] result goes into a buffer of a workspace that all chunks reuse: a fresh 100 MB tensor per
# operation costs more in page faults than the operation itself (measured ~0.45 s vs ~0.05 s for a
# [680, 49152] float32 subtraction on this CPU). The scalar c is not applied here; it is folded into
# the alpha of the gradient matmuls. The forms agree with `kdkit.losses.divergences` to float
# rounding (the JSD mixture is formed in probability space, clamped at LOGIT_FLOOR after its log).
#
# Each form also takes `ce`: a cross-entropy weight (already divided by c) at temperature 1; it adds
# ce·p_S to G (the softmax part of d CE / d logits; the caller subtracts ce at the target ids), so a
# CE term on the same tokens costs no extra pass over the chunk.


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """[C, V] · [C, V] -> [C]: per-row dot products without a [C, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Sum of a ⊙ b over all entries of two contiguous [C, V] tensors, without a temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _log_softmax_(logits: Tensor, floor: bool) -> Tensor:
    """In place: already temperature-scaled logits [C, V] -> log softmax over V.

    floor: clamp at LOGIT_FLOOR first (needed only when a logit can be -inf, i.e. a -inf bias).
    """
    if floor:
        logits.clamp_min_(LOGIT_FLOOR)
    if logits.device.type == "cpu":  # the CPU kernel reads each row before writing it: in place is safe
        return torch._log_softmax(logits, -1, False, out=logits)
    return logits.copy_(torch.log_softmax(logits, dim=-1))  # elsewhere not verified in place


def _forward_kl_closed(
    log_s: Tensor, log_t: Tensor, work: list[Tensor], need_grad: bool, ce: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """KL(p_T ‖ p_S) summed over the chunk; G = p_S − p_T (c = 1/T). Consumes log_s, log_t."""
    p_t = torch.exp(log_t, out=work[0])
    value = _dot(p_t, log_t.sub_(log_s))
    if not need_grad:
        return value, None
    p_s = log_s.exp_()
    if ce:
        p_s.mul_(1.0 + ce)
    return value, p_s.sub_(p_t)


def _reverse_kl_closed(
    log_s: Tensor, log_t: Tensor, work: list[Tensor], need_grad: bool, ce: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """KL(p_S ‖ p_T) summed; G = p_S·(log p_S − log p_T − KL per token) (c = 1/T)."""
    p_s = torch.exp(log_s, out=work[0])
    diff = torch.sub(log_s, log_t, out=log_t)
    per_token = _rowdot(p_s, diff)  # [C]
    value = per_token.sum()
    if not need_grad:
        return value, None
    shift = per_token.unsqueeze(1) - ce if ce else per_token.unsqueeze(1)
    return value, diff.sub_(shift).mul_(p_s)


def _jsd_closed(
    log_s: Tensor, log_t: Tensor, work: list[Tensor], need_grad: bool, beta: float, ce: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M), M = β·p_T + (1−β)·p_S, summed over the chunk.

    d/dp_S of the sum is (1−β)·(log p_S − log M) + const (the p_T/M and p_S/M terms add up to 1),
    so G = p_S·(log p_S − log M − KL(p_S ‖ M) per token) with c = (1−β)/T. β = 0 and 1 are fkl/rkl.
    """
    if beta == 0.0:
        return _forward_kl_closed(log_s, log_t, work, need_grad, ce)
    if beta == 1.0:
        return _reverse_kl_closed(log_s, log_t, work, need_grad, ce)
    p_t = torch.exp(log_t, out=work[0])
    p_s = torch.exp(log_s, out=work[1])
    # log M = log(1−β) + log(p_S + p_T·β/(1−β)); exact zeros (both banned) floor to LOGIT_FLOOR.
    log_m = torch.add(p_s, p_t, alpha=beta / (1.0 - beta), out=work[2]).log_()
    log_m.add_(math.log1p(-beta)).clamp_min_(LOGIT_FLOOR)
    teacher_term = _dot(p_t, log_t.sub_(log_m))
    diff = log_s.sub_(log_m)  # log p_S − log M
    kl_s = _rowdot(p_s, diff)  # KL(p_S ‖ M) per token [C]
    value = beta * teacher_term + (1.0 - beta) * kl_s.sum()
    if not need_grad:
        return value, None
    shift = kl_s.unsqueeze(1) - ce if ce else kl_s.unsqueeze(1)
    return value, diff.sub_(shift).mul_(p_s)


# name -> (form, the divergence kwargs it understands, extra [C, V] buffers it needs)
_CLOSED_FORMS: dict[
    Callable[..., Tensor], tuple[Callable[..., tuple[Tensor, Tensor | None]], frozenset[str], int]
] = {
    forward_kl: (_forward_kl_closed, frozenset(), 1),
    reverse_kl: (_reverse_kl_closed, frozenset(), 1),
    generalized_jsd: (_jsd_closed, frozenset({"beta"}), 3),
}


@dataclass(frozen=True)
class _Closed:
    form: Callable[..., tuple[Tensor, Tensor | None]]
    kwargs: dict[str, float]
    buffers: int
    grad_scale: float  # c without the 1/T: (1 − β) for jsd, 1 otherwise


def _closed_form(fn: DivergenceFn, divergence_kwargs: dict[str, Any]) -> _Closed | None:
    """The closed form for `fn` with its kwargs, or None when it has none (then local autograd)."""
    # By identity, not a dict lookup: a user's callable need not be hashable.
    closed = next((form for known, form in _CLOSED_FORMS.items() if known is fn), None)
    if closed is None or not set(divergence_kwargs) <= closed[1]:
        return None
    form, _, buffers = closed
    if form is _jsd_closed:
        beta = float(divergence_kwargs.get("beta", 0.5))
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        return _Closed(form, {"beta": beta}, buffers, 1.0 - beta if beta < 1.0 else 1.0)
    return _Closed(form, {}, buffers, 1.0)


class _Workspace:
    """[rows, V] compute buffers reused by every chunk of a loss call (and, on CPU, across calls).

    On CPU a fresh 100 MB tensor costs ~0.1-1 s of page faults on first touch (more on a loaded
    machine), more than the matmuls' overhead we are removing, so the last workspace is kept per
    thread (`release_workspace` frees it). CUDA's caching allocator already reuses memory.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.vocab, self.dtype, self.device = rows, vocab, dtype, device
        self.buffers: list[Tensor] = []

    def take(self, count: int, rows: int) -> list[Tensor]:
        while len(self.buffers) < count:
            self.buffers.append(torch.empty((self.rows, self.vocab), dtype=self.dtype, device=self.device))
        return [buffer[:rows] for buffer in self.buffers[:count]]

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers)


_LOCAL = threading.local()


def _workspace(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> _Workspace:
    if device.type != "cpu":
        return _Workspace(rows, vocab, dtype, device)
    kept: _Workspace | None = getattr(_LOCAL, "workspace", None)
    if kept is None or kept.vocab != vocab or kept.dtype != dtype or kept.rows < rows:
        _LOCAL.workspace = None  # free the old buffers before allocating new ones
        kept = _LOCAL.workspace = _Workspace(rows, vocab, dtype, device)
    return kept


def release_workspace() -> int:
    """Free this thread's kept CPU chunk buffers; returns the bytes released."""
    kept: _Workspace | None = getattr(_LOCAL, "workspace", None)
    _LOCAL.workspace = None
    return 0 if kept is None else kept.nbytes


def _project(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    transform: LogitTransform,
    temperature: float,
    out: Tensor,
    slope_out: Tensor | None,
) -> Tensor | None:
    """out [C, V] = transform(hidden @ weightᵀ + bias) / temperature, in place; returns the slope.

    The scale and 1/T ride on the matmul's alpha when there is no soft-cap. With a soft-cap and
    `slope_out`, slope_out = 1 − tanh² (d z'/d z without the scale, which the caller folds in).
    """
    cap = transform.softcap
    alpha = transform.scale / (cap if cap is not None else temperature)
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
        if alpha != 1.0:
            out.mul_(alpha)
    else:
        torch.addmm(bias, hidden, weight.t(), beta=alpha, alpha=alpha, out=out)
    if cap is None:
        return None
    tanh = out.tanh_()
    slope = None
    if slope_out is not None:
        slope = torch.mul(tanh, tanh, out=slope_out).neg_().add_(1.0)
    tanh.mul_(cap / temperature)
    return slope


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
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        closed = _closed_form(fn, options.divergence_kwargs)

        # Only counted tokens are computed: padding and prompt tokens cost nothing. A chunk is
        # then always fully counted, so the divergence gets mask=None.
        rows = mask.nonzero().squeeze(1) if mask is not None else None
        h_s = student_hidden if rows is None else student_hidden.index_select(0, rows)
        h_t = teacher_hidden if rows is None else teacher_hidden.index_select(0, rows)
        ids = targets if rows is None or targets is None else targets.index_select(0, rows)
        n_counted = h_s.shape[0]
        if ids is not None and n_counted and bool(((ids < 0) | (ids >= vocab)).any()):  # one read
            raise ValueError(
                f"fused cross-entropy: every counted token needs a target id in [0, {vocab}), got "
                f"ids from {int(ids.min())} to {int(ids.max())} (mask the positions labelled -100)"
            )

        # Weights are cast once, not per chunk (a no-op when they are already float32).
        w_s = student_weight.to(dtype)
        w_t = teacher_weight.to(dtype)
        b_s = None if student_bias is None else student_bias.to(dtype)
        b_t = None if teacher_bias is None else teacher_bias.to(dtype)
        # Clamping at LOGIT_FLOOR matters only where a logit can be -inf: a -inf bias entry.
        s_floor = b_s is not None and not bool(torch.isfinite(b_s).all())
        t_floor = b_t is not None and not bool(torch.isfinite(b_t).all())

        total = torch.zeros((), dtype=dtype, device=device)
        ce_total = torch.zeros((), dtype=dtype, device=device)
        grad_h = torch.empty((n_counted, h_s.shape[1]), dtype=dtype, device=device) if need_h else None
        # Written (beta = 0) by the first chunk's addmm: no zero-fill pass over [V, H_S].
        grad_w = torch.empty_like(w_s) if need_w else None
        grad_w_written = False
        grad_b = torch.zeros(vocab, dtype=dtype, device=device) if need_b else None
        mean_scale = 1.0 / max(n_counted, 1) if options.reduction == "mean" else 1.0

        # CE at temperature 1 joins the closed form's pass when the divergence's temperature is 1
        # too; otherwise it takes its own log-softmax of the temperature-1 logits first.
        fold_ce = ids is not None and closed is not None and temperature == 1.0
        own_ce = ids is not None and not fold_ce
        want_slope = need_any and s_transform.softcap is not None
        n_extra = closed.buffers if closed is not None else 0
        n_buffers = 2 + n_extra + int(want_slope) + int(own_ce)
        work = _workspace(max(1, min(chunk_size, n_counted)), vocab, dtype, device)

        for start in range(0, n_counted, chunk_size):
            stop = min(start + chunk_size, n_counted)
            buffers = work.take(n_buffers, stop - start)
            logits_s, logits_t, extra = buffers[0], buffers[1], buffers[2 : 2 + n_extra]
            slope_buffer = buffers[2 + n_extra] if want_slope else None
            ce_buffer = buffers[-1] if own_ce else None
            h_s_chunk = h_s[start:stop].to(dtype)
            chunk_ids = None if ids is None else ids[start:stop]
            at = torch.arange(stop - start, device=device)
            # Closed forms take logits already divided by T; the generic divergence divides itself.
            t_temp = temperature if closed is not None else 1.0
            s_temp = 1.0 if (own_ce or closed is None) else temperature
            with torch.no_grad():
                _project(h_t[start:stop].to(dtype), w_t, b_t, t_transform, t_temp, logits_t, None)
                slope = _project(h_s_chunk, w_s, b_s, s_transform, s_temp, logits_s, slope_buffer)
                ce_grad = None
                if own_ce:
                    log_ce = torch._log_softmax(logits_s, -1, False, out=ce_buffer)
                    ce_total -= log_ce[at, chunk_ids].sum()
                    if need_any and ce_weight:
                        ce_grad = log_ce.exp_()
                        ce_grad[at, chunk_ids] -= 1.0
                    if closed is not None and temperature != 1.0:
                        logits_s.div_(temperature)
                if closed is not None:
                    log_s = _log_softmax_(logits_s, s_floor)
                    if fold_ce:
                        ce_total -= log_s[at, chunk_ids].sum()
                    log_t = _log_softmax_(logits_t, t_floor)
                    c = closed.grad_scale / temperature
                    ce_term = ce_weight / c if (fold_ce and need_any and ce_weight) else 0.0
                    value, grad_logits = closed.form(
                        log_s, log_t, extra, need_any, **closed.kwargs, ce=ce_term
                    )
                    if ce_term:
                        grad_logits[at, chunk_ids] -= ce_term
                elif not need_any:
                    value = fn(
                        logits_s,
                        logits_t,
                        temperature=temperature,
                        reduction="sum",
                        **options.divergence_kwargs,
                    )
                    grad_logits, c = None, 1.0
            if closed is None and need_any:
                leaf = logits_s.detach().requires_grad_(True)
                with torch.enable_grad():
                    value = fn(
                        leaf, logits_t, temperature=temperature, reduction="sum", **options.divergence_kwargs
                    )
                    (grad_logits,) = torch.autograd.grad(value, leaf)  # [C, V]
                value, c = value.detach(), 1.0
            total += value
            if grad_logits is None:
                continue
            with torch.no_grad():
                if ce_grad is not None:
                    grad_logits.add_(ce_grad, alpha=ce_weight / c)
                if slope is not None:  # back through the soft-cap: d z'/d z = scale · (1 − tanh²)
                    grad_logits.mul_(slope)
                # c, the transform's scale and the mean's 1/n ride on the matmuls' alpha.
                alpha = c * s_transform.scale * mean_scale
                if grad_h is not None:
                    torch.mm(grad_logits, w_s, out=grad_h[start:stop])  # [C, H_S]
                    if alpha != 1.0:
                        grad_h[start:stop].mul_(alpha)
                if grad_w is not None:  # in place: no [V, H_S] temporary
                    grad_w.addmm_(
                        grad_logits.t(), h_s_chunk, beta=1.0 if grad_w_written else 0.0, alpha=alpha
                    )
                    grad_w_written = True
                if grad_b is not None:
                    grad_b.add_(grad_logits.sum(0), alpha=alpha)
            del grad_logits, value
        del work
        if grad_w is not None and not grad_w_written:
            grad_w.zero_()

        total *= mean_scale
        ce_total *= mean_scale
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
        chunk_size = auto_chunk_size(h_s.shape[0], vocab, device=h_s.device)
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
    chunk_size: tokens per chunk; None picks it so one chunk's float32 logits take ~32 MiB on CPU
        (`auto_chunk_size`: 168 tokens at V = 49,152; at least 128 tokens, so 128 at V = 151,936)
        and ~128 MiB on a GPU.

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
    "ACCELERATOR_CHUNK_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "FusedLinearDivergence",
    "FusedLosses",
    "LinearHead",
    "LogitTransform",
    "auto_chunk_size",
    "fused_causal_lm_losses",
    "fused_head_losses",
    "fused_linear_divergence",
    "release_workspace",
]
