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
from typing import Any

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
# Closed-form value and student-logit gradient of the common divergences, in place.
#
# Autograd through a divergence's elementwise graph was ~60% of a fused step (measured: V = 49,152,
# N = 2,048, H = 576, jsd) and keeps ~12-16 [C, V] intermediates alive. The formulas below give the
# same value and d(sum)/d(student logits) with ~5 [C, V] buffers and no graph. They mirror
# `kdkit.losses.divergences` (same clamping, same stable mixture) so results agree to float rounding.


def _log_softmax_(logits: Tensor, temperature: float) -> Tensor:
    """In place: logits [C, V] -> log softmax(logits / T) over V, as `temperature_log_probs`."""
    if temperature != 1.0:
        logits.div_(temperature)
    logits.clamp_min_(LOGIT_FLOOR)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _softmax_grad_(grad_p: Tensor, p: Tensor, temperature: float) -> Tensor:
    """In place: d/dp [C, V] -> d/d(logits) [C, V] through p = softmax(logits / T)."""
    inner = (grad_p * p).sum(-1, keepdim=True)
    return grad_p.sub_(inner).mul_(p).div_(temperature)


def _forward_kl_closed(log_s: Tensor, log_t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """KL(p_T ‖ p_S) summed over the chunk; d/d(student logits) = (p_S − p_T) / T."""
    p_t = log_t.exp()
    value = (p_t * (log_t - log_s)).sum()
    grad = log_s.exp_().sub_(p_t).div_(temperature)  # log_s is consumed
    return value, grad


def _reverse_kl_closed(log_s: Tensor, log_t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """KL(p_S ‖ p_T) summed; d/dp_S = log p_S − log p_T (+1, which the softmax Jacobian cancels)."""
    diff = log_s - log_t
    p_s = log_s.exp_()  # log_s is consumed
    per_token = (p_s * diff).sum(-1, keepdim=True)
    value = per_token.sum()
    grad = diff.sub_(per_token).mul_(p_s).div_(temperature)
    return value, grad


def _jsd_closed(log_s: Tensor, log_t: Tensor, temperature: float, beta: float) -> tuple[Tensor, Tensor]:
    """β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M), M = β·p_T + (1−β)·p_S, summed over the chunk.

    d/dp_S of the sum is (1−β)·(log p_S − log M) + const (the p_T/M and p_S/M terms add up to 1).
    """
    if beta == 0.0:
        return _forward_kl_closed(log_s, log_t, temperature)
    if beta == 1.0:
        return _reverse_kl_closed(log_s, log_t, temperature)
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
    grad = diff.sub_(kl_s).mul_(p_s).mul_((1.0 - beta) / temperature)
    return value, grad


_CLOSED_FORMS: dict[Callable[..., Tensor], tuple[Callable[..., tuple[Tensor, Tensor]], frozenset[str]]] = {
    forward_kl: (_forward_kl_closed, frozenset()),
    reverse_kl: (_reverse_kl_closed, frozenset()),
    generalized_jsd: (_jsd_closed, frozenset({"beta"})),
}


def _chunk_value_and_grad(
    fn: DivergenceFn,
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: float,
    divergence_kwargs: dict[str, Any],
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Sum of the divergence over a chunk and its gradient to the student logits [C, V] (or None).

    Consumes (overwrites) both logits tensors. Uses the closed form where one exists for `fn`,
    else local autograd on this chunk only.
    """
    # By identity, not a dict lookup: a user's callable need not be hashable.
    closed = next((form for known, form in _CLOSED_FORMS.items() if known is fn), None)
    if closed is not None and set(divergence_kwargs) <= closed[1]:
        form, _ = closed
        if "beta" in divergence_kwargs or form is _jsd_closed:
            beta = float(divergence_kwargs.get("beta", 0.5))
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"beta must be in [0, 1], got {beta}")
            kwargs: dict[str, float] = {"beta": beta}
        else:
            kwargs = {}
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_s = _log_softmax_(logits_s, temperature)
        log_t = _log_softmax_(logits_t, temperature)
        value, grad = form(log_s, log_t, temperature, **kwargs)
        return value, grad if need_grad else None
    if not need_grad:
        with torch.no_grad():
            return fn(logits_s, logits_t, temperature=temperature, reduction="sum", **divergence_kwargs), None
    logits_s.requires_grad_(True)
    with torch.enable_grad():
        value = fn(logits_s, logits_t, temperature=temperature, reduction="sum", **divergence_kwargs)
        (grad,) = torch.autograd.grad(value, logits_s)  # [C, V]
    return value.detach(), grad


class _FusedLinearDivergence(torch.autograd.Function):
    """Chunked forward that also produces the student's gradients; backward rescales them.

    Inputs are already flattened: student_hidden [N, H_S], student_weight [V, H_S],
    teacher_hidden [N, H_T], teacher_weight [V, H_T] (already sliced to the student's V),
    mask [N] bool or None. Returns the scalar sum (reduction "sum") or the sum divided by the
    number of counted tokens (reduction "mean").
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
        fn: DivergenceFn,
        temperature: float,
        reduction: str,
        chunk_size: int,
        divergence_kwargs: dict[str, Any],
    ) -> Tensor:
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
                    fn,
                    temperature,
                    reduction,
                    chunk_size,
                    divergence_kwargs,
                )
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b
        dtype = _compute_dtype(student_hidden.dtype)
        n_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
        device = student_hidden.device

        # Only counted tokens are computed: padding and prompt tokens cost nothing. A chunk is
        # then always fully counted, so the divergence gets mask=None.
        rows = mask.nonzero().squeeze(1) if mask is not None else None
        h_s = student_hidden if rows is None else student_hidden.index_select(0, rows)
        h_t = teacher_hidden if rows is None else teacher_hidden.index_select(0, rows)
        n_counted = h_s.shape[0]

        # Weights are cast once, not per chunk (a no-op when they are already float32).
        w_s = student_weight.to(dtype)
        w_t = teacher_weight.to(dtype)
        b_s = None if student_bias is None else student_bias.to(dtype)
        b_t = None if teacher_bias is None else teacher_bias.to(dtype)

        total = torch.zeros((), dtype=dtype, device=device)
        grad_h = torch.zeros((n_counted, h_s.shape[1]), dtype=dtype, device=device) if need_h else None
        grad_w = torch.zeros_like(w_s) if need_w else None
        grad_b = torch.zeros(vocab, dtype=dtype, device=device) if need_b else None

        for start in range(0, n_counted, chunk_size):
            stop = min(start + chunk_size, n_counted)
            h_s_chunk = h_s[start:stop].to(dtype)
            with torch.no_grad():
                logits_t = nn.functional.linear(h_t[start:stop].to(dtype), w_t, b_t)  # [C, V]
                logits_s = nn.functional.linear(h_s_chunk, w_s, b_s)  # [C, V]
            value, grad_logits = _chunk_value_and_grad(
                fn, logits_s, logits_t, temperature, divergence_kwargs, need_any
            )
            del logits_s, logits_t
            total += value
            if grad_logits is None:
                continue
            if grad_h is not None:
                torch.mm(grad_logits, w_s, out=grad_h[start:stop])  # [C, H_S]
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), h_s_chunk)  # in place: no [V, H_S] temporary per chunk
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            del grad_logits, value

        scale = 1.0 / max(n_counted, 1) if reduction == "mean" else 1.0
        if scale != 1.0:
            total *= scale
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
        return total.to(student_hidden.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("fused_linear_divergence: its gradients were already used by a backward")
        grads, ctx.grads = ctx.grads, None
        # grad_output is 1.0 in the usual loss.backward(); skip the multiply (and its copy) then.
        unit = torch.equal(grad_output, torch.ones_like(grad_output))
        grad_h, grad_w, grad_b = (g if g is None or unit else g * grad_output for g in grads)
        del grads
        # Teacher tensors, mask and the non-tensor settings never get a gradient.
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None


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
    **divergence_kwargs: Any,
) -> Tensor:
    """Divergence between teacher and student token distributions, from hidden states, in chunks.

    Equals `DIVERGENCES.get(divergence)(h_S @ W_S^T + b_S, h_T @ W_T^T + b_T, temperature=...,
    mask=mask, reduction=reduction, **divergence_kwargs)` in value and in the gradients to the
    student's hidden states, weight and bias, without materialising the [N, V] logits of either
    model: at most `chunk_size` tokens' logits exist at a time. Teacher tensors never get a
    gradient (the teacher side runs under no_grad).

    student_hidden: [..., H_S] final hidden states (after the final norm), any leading dims
    student_weight: [V, H_S] output projection (LM head); student_bias: [V] or None
    teacher_hidden: [..., H_T] with the same leading dims; teacher_weight: [V_T, H_T]; teacher_bias: [V_T]
    mask: [...] bool, True = the token counts (e.g. `labels != -100`); None = all count
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
    Dtypes: each chunk is computed in float32 (float64 stays float64) even for bf16/fp16
    inputs; the loss comes back in the student hidden states' dtype, gradients in each input's.
    Returns a scalar tensor.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"fused_linear_divergence: reduction must be 'mean' or 'sum', got {reduction!r} "
            "(per-token values would need the per-token gradients the fused loss never keeps)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"fused_linear_divergence: student hidden states {tuple(student_hidden.shape)} and "
            f"teacher hidden states {tuple(teacher_hidden.shape)} differ in their leading dims"
        )
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"fused_linear_divergence: student weight {tuple(student_weight.shape)} is not "
            f"[V, {student_hidden.shape[-1]}]"
        )
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"fused_linear_divergence: teacher weight {tuple(teacher_weight.shape)} is not "
            f"[V_T, {teacher_hidden.shape[-1]}]"
        )
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] < vocab:
        raise ValueError(
            f"fused_linear_divergence: the teacher's vocabulary ({teacher_weight.shape[0]}) is "
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
                f"fused_linear_divergence: mask {tuple(mask.shape)} does not match the hidden "
                f"states' leading dims {tuple(student_hidden.shape[:-1])}"
            )
        flat_mask = mask.reshape(-1).to(device=h_s.device, dtype=torch.bool)
    if chunk_size is None:
        chunk_size = auto_chunk_size(h_s.shape[0], vocab)
    if chunk_size < 1:
        raise ValueError(f"fused_linear_divergence: chunk_size must be >= 1, got {chunk_size}")

    return _FusedLinearDivergence.apply(
        h_s,
        student_weight,
        student_bias,
        h_t,
        teacher_weight,
        teacher_bias,
        flat_mask,
        _resolve(divergence),
        float(temperature),
        reduction,
        int(chunk_size),
        divergence_kwargs,
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


__all__ = ["DEFAULT_CHUNK_BYTES", "FusedLinearDivergence", "auto_chunk_size", "fused_linear_divergence"]
