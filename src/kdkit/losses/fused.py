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
the loss still computes in float32; on a CUDA GPU bf16/fp16 inputs keep bf16/fp16 matmuls with
float32 outputs (see "Half-precision matmuls" below), and so do float32 inputs under a bf16/fp16
autocast (mixed-precision training), as the model's own lm_head would. Optionally a cross-entropy term on the
same tokens (targets, ce_weight) and each model's post-head logit transform (scale, soft-cap) are
applied in the same chunk pass. Any divergence of
`DIVERGENCES` (or any callable with its signature) works.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
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
DEFAULT_CHUNK_BYTES = 32 * 2**20
MIN_CPU_CHUNK_TOKENS = 128
# On a CUDA GPU the chunk is sized from the device's memory: one [chunk, V] float32 buffer takes
# 1/128 of it (about 1.1 GB, 1,808 tokens at V = 151,936 on a 141 GB H200; 640 MB on an 80 GB
# card), so the 5-8 chunk-sized buffers of a step take at most ~6% of the device. Larger chunks
# matter there: the weight-gradient matmul G^T h of a chunk reads and writes the whole float32
# [V, H] accumulator, which costs as much as the matmul itself at a few hundred tokens. Other
# accelerators (or none known): 128 MiB.
CUDA_CHUNK_FRACTION = 1 / 128
MIN_CUDA_CHUNK_BYTES = 128 * 2**20
ACCELERATOR_CHUNK_BYTES = 128 * 2**20

DivergenceFn = Callable[..., Tensor]


def _accelerator_chunk_bytes(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        return max(MIN_CUDA_CHUNK_BYTES, int(total * CUDA_CHUNK_FRACTION))
    return ACCELERATOR_CHUNK_BYTES


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
    rows per call waste that work at large V); on a CUDA device `CUDA_CHUNK_FRACTION` of its memory
    (at least `MIN_CUDA_CHUNK_BYTES`); `ACCELERATOR_CHUNK_BYTES` on any other device.
    Returns an int in [1, max(n_tokens, 1)]; a multiple of 8 when above 8.
    """
    minimum = 1
    if chunk_bytes is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        chunk_bytes = DEFAULT_CHUNK_BYTES if on_cpu else _accelerator_chunk_bytes(torch.device(device))
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
# Half-precision matmuls with float32 outputs (bf16/fp16 inputs on a GPU)
#
# Upcasting bf16 weights and hidden states to float32 would run the four large matmuls at the
# GPU's float32 rate (~15x below its bf16 tensor-core rate on an H100/H200). Instead they run on
# the half-precision inputs with float32 accumulation and float32 outputs (`out_dtype`, CUDA only,
# torch >= 2.8): the logits are then exactly those of the float32 product of the same bf16 values
# (the products of two bf16 numbers are exact in float32), and the chunk's softmax math stays
# float32. Only the gradient products see one more rounding: d loss / d logits (entries in [-1, 1])
# is cast to the inputs' dtype before G·W and Gᵀ·h, as the returned gradients are in that dtype
# anyway. The weight gradient accumulates over chunks in float32.
# Which form works is probed once per (device, dtype) on tiny exact matrices; a device or torch
# build without it falls back to upcasting (correct, slower).

_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Device types where bf16/fp16 inputs take the half-precision matmul path. Tests add "cpu", where
# the same calls are emulated by upcasting (identical numerics, none of the speed).
HALF_MATMUL_DEVICE_TYPES = {"cuda"}
_HALF_MODES: dict[tuple[str, int | None, torch.dtype], str | None] = {}


def _mm_f32(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out (float32 or float64) = a @ b, for a, b of out's dtype or of a half dtype (fp32 accumulation)."""
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    if out.device.type == "cuda":
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    return torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)  # emulation (tests)


def _addmm_f32(acc: Tensor, a: Tensor, b: Tensor, *, beta: float, alpha: float, mode: str | None) -> None:
    """acc = beta·acc + alpha·(a @ b) for a float32 `acc`, a and b float32 or half (fp32 accumulation).

    mode (from `_half_mode`): "addmm" = one cuBLAS call with a float32 C and half A, B;
    "temp" = the product into a temporary float32 [V, H] and an add; None / emulation: upcast.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta, alpha=alpha)
    elif mode == "addmm":
        torch.addmm(acc, a, b, beta=beta, alpha=alpha, out_dtype=acc.dtype, out=acc)
    elif mode == "temp":
        product = _mm_f32(a, b, torch.empty_like(acc))
        if beta == 0.0:
            acc.copy_(product).mul_(alpha)
        else:
            if beta != 1.0:
                acc.mul_(beta)
            acc.add_(product, alpha=alpha)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta, alpha=alpha)


def _near(got: Tensor, expected: Tensor) -> bool:
    # Exact values, but a reduced-precision reduction (allowed for bf16 by default) may round them:
    # the probe only has to tell a working call from a wrong one.
    return got.dtype == expected.dtype and torch.allclose(got, expected, rtol=1e-2, atol=1e-2)


def _probe_half_mode(device: torch.device, dtype: torch.dtype) -> str | None:
    """The first form of half-input, float32-output matmul that works exactly on this device."""

    def exact(rows: int, cols: int, salt: int) -> Tensor:  # small multiples of 1/8: exact in fp16/bf16
        grid = torch.arange(rows * cols, device=device).reshape(rows, cols)
        return (((grid * 37 + salt) % 11) - 5).to(torch.float32) / 8

    # The layouts of the loss's own calls: h [C, H], W [V, H], G [C, V], all contiguous.
    h32, w32, g32 = exact(24, 40, 1), exact(56, 40, 2), exact(24, 56, 3)
    h, w, g = h32.to(dtype), w32.to(dtype), g32.to(dtype)
    try:
        logits = _mm_f32(h, w.t(), torch.empty(24, 56, device=device))  # h · Wᵀ
        grad_h = _mm_f32(g, w, torch.empty(24, 40, device=device))  # G · W
        if not (_near(logits, h32 @ w32.t()) and _near(grad_h, g32 @ w32)):
            return None
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    expected = 2.0 * w32 + 0.5 * (g32.t() @ h32)  # Gᵀ · h accumulated into a [V, H] float32
    for mode in ("addmm", "temp"):
        acc = w32.clone()
        try:
            _addmm_f32(acc, g.t(), h, beta=2.0, alpha=0.5, mode=mode)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if acc.dtype == torch.float32 and _near(acc, expected):
            return mode
    return None


def _half_mode(device: torch.device, dtype: torch.dtype) -> str | None:
    """ "addmm" / "temp" when `dtype` inputs take the half-precision matmul path on `device`, else None."""
    if dtype not in _HALF_DTYPES or device.type not in HALF_MATMUL_DEVICE_TYPES:
        return None
    key = (device.type, device.index, dtype)
    if key not in _HALF_MODES:
        _HALF_MODES[key] = _probe_half_mode(device, dtype)
    return _HALF_MODES[key]


def _matmul_dtype(
    hidden: Tensor, weight: Tensor, compute: torch.dtype, autocast: torch.dtype | None = None
) -> tuple[torch.dtype, str | None]:
    """(dtype its matmuls run in, accumulation mode): its half dtype where supported, else `compute`.

    autocast: the half dtype autocast was running at the call (mixed-precision training). Where
    the device has the half-precision path, the matmuls take it, as the model's own `lm_head` would
    under autocast (float32 outputs here, and the chunk math stays float32): otherwise float32
    weights would run the four large matmuls at the float32 rate (~15x slower on an H100/H200)."""
    if autocast is not None and autocast in _HALF_DTYPES:
        mode = _half_mode(hidden.device, autocast)
        if mode is not None:
            return autocast, mode
    if hidden.dtype == weight.dtype:
        mode = _half_mode(hidden.device, hidden.dtype)
        if mode is not None:
            return hidden.dtype, mode
    return compute, None


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


# Sums over [C, V] are products written into a spent buffer, then `sum` (cascade summation on CPU,
# a tree on GPU): a BLAS dot or bmm accumulates the C·V (or V) float32 terms in sequence and was
# 1e-5 to 5e-4 off the float64 value over a 168 x 49,152 chunk.


def _log_softmax_(logits: Tensor, floor: bool) -> Tensor:
    """In place: already temperature-scaled logits [C, V] -> log softmax over V.

    floor: clamp at LOGIT_FLOOR first (needed only when a logit can be -inf, i.e. a -inf bias).
    """
    if floor:
        logits.clamp_min_(LOGIT_FLOOR)
    if logits.device.type == "cpu":  # the CPU kernel reads each row before writing it: in place is safe
        return torch._log_softmax(logits, -1, False, out=logits)
    # Elsewhere not verified in place: a new tensor (the caching allocator reuses its memory from
    # chunk to chunk; no copy back into `logits`, which would be one more pass over [C, V]).
    return torch.log_softmax(logits, dim=-1)


def _forward_kl_closed(
    log_s: Tensor, log_t: Tensor, work: list[Tensor], need_grad: bool, ce: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """KL(p_T ‖ p_S) summed over the chunk; G = p_S − p_T (c = 1/T). Consumes log_s, log_t."""
    p_t = torch.exp(log_t, out=work[0])
    value = log_t.sub_(log_s).mul_(p_t).sum()
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
    per_token = torch.mul(p_s, diff, out=log_s).sum(-1)  # [C]; log_s's buffer is spent
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
    teacher_term = log_t.sub_(log_m).mul_(p_t).sum()
    diff = log_s.sub_(log_m)  # log p_S − log M
    kl_s = torch.mul(p_s, diff, out=log_t).sum(-1)  # KL(p_S ‖ M) per token [C]; log_t is spent
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

    @property
    def kind(self) -> tuple[str, float]:
        """("fkl" | "rkl" | "jsd", β) for `_closed_functional` (jsd at β = 0 / 1 is fkl / rkl)."""
        if self.form is _forward_kl_closed:
            return "fkl", 0.0
        if self.form is _reverse_kl_closed:
            return "rkl", 1.0
        beta = self.kwargs["beta"]
        return ("fkl" if beta == 0.0 else "rkl" if beta == 1.0 else "jsd"), beta


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


# ----------------------------------------------------------------------------------------------
# The same closed forms as one functional graph, for torch.compile (`_compile_wanted`)
#
# Eager, a chunk's closed form is ~15-20 elementwise kernels, each a full pass over [C, V] float32
# in memory: on a GPU, whose bf16 matmuls are ~150x faster per byte than its memory, those passes
# cost more than the four matmuls. Compiled (Inductor/Triton), the same math becomes a few fused
# reductions that read the two logit buffers ~3 times and write G once in the matmul dtype. Each
# new (divergence, dtype, CE) combination compiles once (tens of seconds), so it is the default only
# where it pays: CUDA with 16-bit inputs. A compiler failure warns once and runs eagerly.


def _closed_functional(
    logits_s: Tensor,
    logits_t: Tensor,
    ids: Tensor | None,
    kind: str,
    beta: float,
    ce: float,
    floor_s: bool,
    floor_t: bool,
    need_grad: bool,
    grad_dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(divergence summed over the chunk, CE summed or None, G in `grad_dtype` or None), as the closed forms.

    logits_*: [C, V] already divided by T (and transformed); ids [C] target ids of a CE term at T = 1
    (then `ce` = its weight / c; G gets ce·p_S, and −ce at the target ids); kind: "fkl", "rkl", "jsd".
    """
    if floor_s:
        logits_s = logits_s.clamp_min(LOGIT_FLOOR)
    if floor_t:
        logits_t = logits_t.clamp_min(LOGIT_FLOOR)
    log_s = torch.log_softmax(logits_s, dim=-1)
    log_t = torch.log_softmax(logits_t, dim=-1)
    p_s = log_s.exp()
    if kind == "fkl":
        p_t = log_t.exp()
        value = (p_t * (log_t - log_s)).sum()
        grad = p_s * (1.0 + ce) - p_t if need_grad else None
    elif kind == "rkl":
        diff = log_s - log_t
        per_token = (p_s * diff).sum(-1, keepdim=True)
        value = per_token.sum()
        grad = p_s * (diff - per_token + ce) if need_grad else None
    else:
        p_t = log_t.exp()
        log_m = (torch.log(p_s + p_t * (beta / (1.0 - beta))) + math.log1p(-beta)).clamp_min(LOGIT_FLOOR)
        diff = log_s - log_m
        kl_s = (p_s * diff).sum(-1, keepdim=True)
        value = beta * (p_t * (log_t - log_m)).sum() + (1.0 - beta) * kl_s.sum()
        grad = p_s * (diff - kl_s + ce) if need_grad else None
    ce_sum = None
    if ids is not None:
        hit = torch.arange(logits_s.shape[-1], device=logits_s.device)[None, :] == ids[:, None]
        ce_sum = -torch.where(hit, log_s, 0.0).sum()
        if grad is not None and ce:
            grad = torch.where(hit, grad - ce, grad)
    return value, ce_sum, None if grad is None else grad.to(grad_dtype)


# KDKIT_FUSED_COMPILE=1: always compiled; 0: never; unset (default): compiled on CUDA for 16-bit
# inputs, where the eager chunk math's memory passes cost several times the matmuls (H200, V =
# 151,936, H = 1,024, bf16: jsd 4.2x the matmul floor eager, 2.1x compiled, TRL's chunked loss
# 3.2x; in float32 the eager form is already 1.13-1.26x). Tests and benchmarks set this directly.
COMPILE_CLOSED_FORMS: bool | None = {"1": True, "0": False}.get(os.environ.get("KDKIT_FUSED_COMPILE", ""))


def _compile_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the chunk math runs compiled for inputs of `dtype` on `device` (see above)."""
    if COMPILE_CLOSED_FORMS is not None:
        return COMPILE_CLOSED_FORMS
    return device.type == "cuda" and dtype in _HALF_DTYPES
_COMPILED: dict[str, Any] = {}


def _compiled_closed() -> Callable[..., tuple[Tensor, Tensor | None, Tensor | None]] | None:
    """The compiled `_closed_functional` (None after a compile failure, which warns once)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_closed_functional, dynamic=True, fullgraph=True)
    return _COMPILED["fn"]


def _run_closed_functional(*args: Any) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """The compiled closed form on one chunk, or None when compiling failed (the caller runs eager)."""
    fn = _compiled_closed()
    if fn is None:
        return None
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a compiler failure must not fail the training step
        _COMPILED["fn"] = None
        _COMPILED["error"] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"kdkit: torch.compile of the fused loss's closed forms failed ({type(error).__name__}); "
            "running them eagerly from now on (KDKIT_FUSED_COMPILE=0 silences this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


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
    hidden and weight may be half precision (see `_mm_f32`); out and bias are float32/float64.
    """
    cap = transform.softcap
    alpha = transform.scale / (cap if cap is not None else temperature)
    if bias is not None and hidden.dtype == out.dtype:
        torch.addmm(bias, hidden, weight.t(), beta=alpha, alpha=alpha, out=out)
    else:
        _mm_f32(hidden, weight.t(), out)
        if bias is not None:
            out.add_(bias)
        if alpha != 1.0:
            out.mul_(alpha)
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
        # then refuse the float32 `out=` buffers: the loss is computed in float32 regardless, its
        # matmuls in autocast's dtype where the device has the half-precision path (`_matmul_dtype`).
        device_type = student_hidden.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            options = replace(options, autocast=torch.get_autocast_dtype(device_type))
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
        # (The nonzero is this call's one host synchronisation; none happens per chunk.)
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

        # The matmuls run in each model's half dtype where the device supports it (float32 outputs),
        # else in the compute dtype. Weights are cast once, not per chunk (a no-op when they match).
        mm_s, mode_s = _matmul_dtype(student_hidden, student_weight, dtype, options.autocast)
        mm_t, _ = _matmul_dtype(teacher_hidden, teacher_weight, dtype, options.autocast)
        w_s = student_weight.to(mm_s)
        w_t = teacher_weight.to(mm_t)
        b_s = None if student_bias is None else student_bias.to(dtype)
        b_t = None if teacher_bias is None else teacher_bias.to(dtype)
        # Clamping at LOGIT_FLOOR matters only where a logit can be -inf: a -inf bias entry.
        s_floor = b_s is not None and not bool(torch.isfinite(b_s).all())
        t_floor = b_t is not None and not bool(torch.isfinite(b_t).all())

        total = torch.zeros((), dtype=dtype, device=device)
        ce_total = torch.zeros((), dtype=dtype, device=device)
        grad_h = torch.empty((n_counted, h_s.shape[1]), dtype=dtype, device=device) if need_h else None
        # Written (beta = 0) by the first chunk's addmm: no zero-fill pass over [V, H_S].
        grad_w = torch.empty(w_s.shape, dtype=dtype, device=device) if need_w else None
        grad_w_written = False
        grad_b = torch.zeros(vocab, dtype=dtype, device=device) if need_b else None
        mean_scale = 1.0 / max(n_counted, 1) if options.reduction == "mean" else 1.0

        # CE at temperature 1 joins the closed form's pass when the divergence's temperature is 1
        # too; otherwise it takes its own log-softmax of the temperature-1 logits first.
        fold_ce = ids is not None and closed is not None and temperature == 1.0
        own_ce = ids is not None and not fold_ce
        want_slope = need_any and s_transform.softcap is not None
        # The compiled closed form covers the common case: no soft-cap, CE (if any) at T = 1.
        functional = (
            _compile_wanted(device, mm_s) and closed is not None and not (own_ce or s_transform.softcap)
        )
        n_extra = closed.buffers if closed is not None else 0
        n_buffers = 2 + n_extra + int(want_slope) + int(own_ce)
        work = _workspace(max(1, min(chunk_size, n_counted)), vocab, dtype, device)
        arange = torch.arange(min(chunk_size, max(n_counted, 1)), device=device) if ids is not None else None

        for start in range(0, n_counted, chunk_size):
            stop = min(start + chunk_size, n_counted)
            # (the compiled form needs only the two logit buffers; `extra` is taken if it falls back)
            functional = functional and _compiled_closed() is not None
            buffers = work.take(2 if functional else n_buffers, stop - start)
            logits_s, logits_t, extra = buffers[0], buffers[1], buffers[2 : 2 + n_extra]
            slope_buffer = buffers[2 + n_extra] if want_slope else None
            ce_buffer = buffers[-1] if own_ce else None
            h_s_chunk = h_s[start:stop].to(mm_s)
            chunk_ids = None if ids is None else ids[start:stop]
            at = None if arange is None else arange[: stop - start]
            # Closed forms take logits already divided by T; the generic divergence divides itself.
            t_temp = temperature if closed is not None else 1.0
            s_temp = 1.0 if (own_ce or closed is None) else temperature
            with torch.no_grad():
                _project(h_t[start:stop].to(mm_t), w_t, b_t, t_transform, t_temp, logits_t, None)
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
                done = None
                if functional:
                    c = closed.grad_scale / temperature
                    ce_term = ce_weight / c if (fold_ce and need_any and ce_weight) else 0.0
                    kind, beta = closed.kind
                    done = _run_closed_functional(
                        logits_s, logits_t, chunk_ids, kind, beta, ce_term, s_floor, t_floor, need_any, mm_s
                    )
                if done is not None:
                    value, ce_chunk, grad_logits = done
                    if ce_chunk is not None:
                        ce_total += ce_chunk
                elif closed is not None:
                    if functional:  # the compiler failed on this chunk: eager from here on
                        functional, extra = False, work.take(n_buffers, stop - start)[2 : 2 + n_extra]
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
                if grad_b is not None:
                    grad_b.add_(grad_logits.sum(0, dtype=dtype), alpha=alpha)
                # Half-precision matmuls take G in the inputs' dtype (see `_mm_f32`).
                g_mm = grad_logits if grad_logits.dtype == mm_s else grad_logits.to(mm_s)
                if grad_h is not None:
                    _mm_f32(g_mm, w_s, grad_h[start:stop])  # [C, H_S]
                    if alpha != 1.0:
                        grad_h[start:stop].mul_(alpha)
                if grad_w is not None:  # in place: no [V, H_S] temporary
                    _addmm_f32(
                        grad_w,
                        g_mm.t(),
                        h_s_chunk,
                        beta=1.0 if grad_w_written else 0.0,
                        alpha=alpha,
                        mode=mode_s,
                    )
                    grad_w_written = True
                del g_mm
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
        grad_h, grad_w, grad_b = _scaled(grads, grad_output)
        del grads
        # Teacher tensors, mask, targets and the settings never get a gradient.
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _scaled(grads: list[Tensor | None], grad_output: Tensor) -> list[Tensor | None]:
    """The stored gradients times the incoming scalar gradient, in place (they are this call's own).

    On CPU, grad_output = 1 (the usual loss.backward()) skips the pass over [V, H]; elsewhere that
    test would be a host synchronisation, and the multiply costs less than one.
    """
    if grad_output.device.type == "cpu" and torch.equal(grad_output, torch.ones_like(grad_output)):
        return grads
    return [None if g is None else g.mul_(grad_output.to(g.dtype)) for g in grads]


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
    autocast: torch.dtype | None = None  # autocast's half dtype at the call (set by forward)


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
        and 1/128 of the device's memory on a CUDA GPU (1,808 tokens at V = 151,936 on an H200).

    Vocabulary padding: a teacher with V_T > V (same tokenizer, embedding padded to a multiple
    of 64/128, as Qwen's 151,936 vs 152,064) is cut to the student's first V rows; the padded
    rows are not real tokens. A teacher with V_T < V is an error.
    Dtypes: each chunk's softmax math is float32 (float64 stays float64) even for bf16/fp16 inputs
    and under autocast; the loss comes back in the student hidden states' dtype, gradients in
    each input's. On a CUDA GPU, bf16/fp16 hidden states with weights of the same dtype keep their
    matmuls in that dtype with float32 outputs (d loss/d logits is rounded to it for the two
    gradient products); elsewhere they are upcast. There the fkl/rkl/jsd chunk math is compiled
    with torch.compile (fewer passes over memory; once per combination, tens of seconds);
    `KDKIT_FUSED_COMPILE=1` compiles it everywhere, `=0` never.
    Returns a scalar tensor (use `fused_head_losses` for the parts separately).
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
    "COMPILE_CLOSED_FORMS",
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
