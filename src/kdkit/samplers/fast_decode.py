"""A lean decode path for Llama-family causal LMs (Llama, Mistral, Qwen2, Qwen3) used by sampling.

At the widths kdkit distils to, one decode step of Hugging Face's `LlamaForCausalLM` is mostly
Python and dispatch overhead (mask building, cache classes, the attention interface, decorators:
~800 tensor ops per step for the 3-layer arithmetic student). `LeanDecoder` computes the same
function in about half the ops, each without the module machinery around it: one matmul for
q/k/v and one for gate/up at widths up to `FUSE_MAX_WIDTH` (norm weights folded in), `addmm`
with the residual, rotary cos/sin looked up from a table the model's own rotary module computed,
a preallocated static KV cache, SDPA over the filled prefix only, and finished rows dropped from
the batch and the cache.

It reads the *live* module's weights when it is built (once per `sample_tokens` call; fused
matrices are copies made then), so samples always come from the current student, never a stale
one. `lean_decoder_support` names the first thing it does not reproduce exactly (another family, a
subclass or hooked module such as a PEFT adapter, dynamic/long RoPE, a sliding window shorter than
the sequence, attention dropout in training mode, ...); `kdkit.samplers.generation.sample_tokens`
then falls back to its generic loop over `model(...)` and logs the reason once at debug level.

`StaticStepDecoder` (below) is the same decoder with a fixed-shape decode step (whole static batch,
attention over the whole cache, slot and positions in device tensors) that a CUDA device runs as
one CUDA graph replay per token; `sample_tokens` picks it on CUDA (`GenerationSettings.graph_decode`)
and keeps it, buffers and graph, across calls of the same shape (`static_step_decoder`: per model,
weakly, the last `GRAPH_CACHE_SIZE` shapes, cache lengths bucketed to `CACHE_BUCKET`), reading the
live weights at every call: views of the parameters, fused copies remade in place, a replaced
parameter storage detected (the decoder is rebuilt).

`LeanDecoder.hidden` runs the same layers over whole sequences (no cache, no gradient): the live
teacher signals use it for a frozen teacher (`frozen_teacher_decoder`), whose weights it reads
once and keeps while the teacher's parameters stay the same, unmodified tensors.

The student's forward in training runs `hidden` too (`StudentView`, through
`trainable_student_decoder`): a `LeanDecoder(model, trainable=True)` built at every forward reads the
parameters themselves (fused q/k/v and gate/up matrices are differentiable `torch.cat`s, no norm
folded), so gradients reach the model's own parameters; `KDKIT_LEAN_STUDENT=0` turns it off.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# model_type -> the Hugging Face class whose forward this module reproduces (transformers 5.x).
SUPPORTED: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_EXACT_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _is_rms_norm(module: object, family_module: str) -> bool:
    return (
        isinstance(module, nn.Module)
        and type(module).__name__.endswith("RMSNorm")
        and type(module).__module__ == family_module
        and isinstance(getattr(module, "weight", None), Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _plain_linear(module: object) -> bool:
    return type(module) is nn.Linear


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    # torch hooks, accelerate's (it swaps `forward` and sets `_hf_hook`), or a patched instance forward
    return any(
        m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") or "forward" in vars(m)
        for m in model.modules()
    )


def lean_decoder_support(model: nn.Module, total_length: int | None = None) -> str | None:
    """None when `LeanDecoder` reproduces `model`'s forward exactly, else the first reason it does not.

    total_length: prompt width + new tokens (checked against a sliding attention window).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    expected = SUPPORTED.get(model_type)  # type: ignore[arg-type]
    if expected is None:
        return f"model_type {model_type!r} is not one of {sorted(SUPPORTED)}"
    cls = type(model)
    if cls.__name__ != expected or not cls.__module__.startswith("transformers.models."):
        return f"{cls.__module__}.{cls.__name__} is not transformers' {expected} (a subclass or wrapper)"
    family = cls.__module__
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} (only silu)"
    attn_impl = getattr(config, "_attn_implementation", None) or "eager"
    if attn_impl not in _EXACT_ATTENTION:
        return f"attention implementation {attn_impl!r}"
    if model.training and float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout in training mode"
    base = getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return f"rope type {rope_type!r} (its frequencies change with the sequence length)"
    if type(getattr(base, "embed_tokens", None)) is not nn.Embedding or not _plain_linear(
        getattr(model, "lm_head", None)
    ):
        return "embedding or LM head is not a plain nn.Embedding / nn.Linear"
    if not _is_rms_norm(getattr(base, "norm", None), family):
        return "final norm is not the family's RMSNorm"
    layers = list(base.layers)[: config.num_hidden_layers]
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if (
            type(layer).__module__ != family
            or type(attn).__module__ != family
            or type(mlp).__module__ != family
        ):
            return f"layer {i} is not the family's own decoder layer"
        if not all(_plain_linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"layer {i} attention projections are not plain nn.Linear (an adapter or quantised layer?)"
        if not all(_plain_linear(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i} MLP projections are not plain nn.Linear"
        if not all(
            _is_rms_norm(getattr(layer, n, None), family)
            for n in ("input_layernorm", "post_attention_layernorm")
        ):
            return f"layer {i} norms are not the family's RMSNorm"
        qk_norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if model_type == "qwen3" and not all(_is_rms_norm(m, family) for m in qk_norms):
            return f"layer {i} q/k norms are not the family's RMSNorm"
        if model_type == "qwen3" and qk_norms[0].variance_epsilon != qk_norms[1].variance_epsilon:
            return f"layer {i} q_norm and k_norm have different eps"
        if model_type != "qwen3" and any(m is not None for m in qk_norms):
            return f"layer {i} has q/k norms the {model_type} forward does not apply"
        window = getattr(attn, "sliding_window", None)
        if model_type == "mistral":
            window = getattr(config, "sliding_window", None)
        if window is not None and (total_length is None or int(window) < total_length):
            return f"layer {i} has a sliding attention window ({window}) shorter than prompt + new tokens"
    if _has_hooks(model):
        return "forward hooks or a patched forward on the model (hooks, accelerate offloading, ...)"
    return None


def _rms(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Hugging Face's Llama RMSNorm over the last dim: weight · (x in float32 · rsqrt(mean(x²) + eps)),
    cast back. weight: [D], or [..., D] broadcast over x's leading dims (per-head q/k norms), or None
    when it was folded into the next matmul's weight. (Written out: `F.rms_norm` and `mean` are
    several times slower than these six ops on small CPU tensors.)
    """
    h = x if x.dtype == torch.float32 else x.float()  # (`.float()` is a dispatched op even as a no-op)
    h = h * h.square().sum(-1, keepdim=True).div_(h.shape[-1]).add_(eps).rsqrt_()
    if h.dtype != x.dtype:
        h = h.to(x.dtype)
    return h if weight is None else weight * h


# A CPU matmul of a few rows (decode steps) by a large weight is bound by reading the weight; there
# W·xᵀ (the weight as stored, [out, in]) ran 1.2-2x faster than x·Wᵀ with MKL on this project's
# CPUs (SmolLM2's head at 4 rows: 14 vs 28 ms; its layers: 23 vs 27 ms), and no slower at the small
# widths where weights stay in cache, which are left as they are. Rows up to this many...
WEIGHT_FIRST_MAX_ROWS = 32
# ...for weights of at least this many elements (1 MB in float32).
WEIGHT_FIRST_MIN_NUMEL = 1 << 18


def _linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    """residual + x·Wᵀ + b with W given transposed ([in, out]): one `addmm` per step for 2-D x.

    Under autocast the residual is added outside the matmul, as Hugging Face's layers do: autocast
    runs `addmm` in its 16-bit dtype, which would make the residual stream 16-bit where the
    model's stays float32 (samples would then come from a slightly different function). A few rows
    by a large weight on a CPU, without autograd, compute (W·xᵀ)ᵀ (`WEIGHT_FIRST_MAX_ROWS`): the
    same sums."""
    if (
        x.dim() == 2
        and x.shape[0] <= WEIGHT_FIRST_MAX_ROWS
        and x.device.type == "cpu"
        and weight_t.numel() >= WEIGHT_FIRST_MIN_NUMEL
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
    ):
        # (x row-major: MKL's fast case is the weight times a transposed row-major x; the result
        # made row-major again for the ops after it, a copy of rows x out elements)
        out = torch.mm(weight_t.t(), x.contiguous().t()).t().contiguous()
        if bias is not None:
            out.add_(bias)
        return out if residual is None else out.add_(residual)
    if x.dim() == 2:
        if residual is not None and not torch.is_autocast_enabled(x.device.type):
            out = torch.addmm(residual, x, weight_t)
            return out if bias is None else out.add_(bias)
        if residual is None:
            return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    out = torch.matmul(x, weight_t)
    if bias is not None:
        out = out + bias
    return out if residual is None else residual + out


# Up to this model width the q/k/v and gate/up weights are concatenated into one matmul each (a
# copy per decoder, remade in place at each later sampling call, with the preceding norm's weight
# folded in, in float32): at small widths a
# decode step is dispatch overhead and one matmul beats three. Above it the copy costs more than the
# dispatches it saves (SmolLM2's 576: ~0.1 s of copies per call), so the model's own matrices are used.
FUSE_MAX_WIDTH = 256
# The same for a trainable decoder (the student's forward), whose fused matrices are differentiable
# `torch.cat`s made at every forward, their backward a split of the gradient.
TRAINABLE_FUSE_MAX_WIDTH = 256
# A frozen decoder's `hidden` computes a prompt prefix shared by every row of a batch once, when it
# is at least this many tokens, and keeps the last this many such prefixes.
SHARED_PREFIX_MIN = 8
SHARED_PREFIX_CACHE = 4


@dataclass
class _Proj:
    """x -> the concatenated outputs of one or more linear maps (weights transposed: [in, out]).

    `sources`: for a fused copy, the linears and the folded norm weight it was made from (`refresh`
    remakes it in place from the live weights); None for views of the live weights."""

    weights: list[Tensor]
    biases: list[Tensor | None]
    sources: tuple[list[nn.Linear], Tensor | None] | None = None

    @classmethod
    def of(
        cls, linears: list[nn.Linear], fuse: bool, scale: Tensor | None = None, trainable: bool = False
    ) -> _Proj:
        """The maps of `linears`: one concatenated copy when `fuse` (input columns times `scale`,
        the folded norm weight), else views of the live weights. trainable: the parameters
        themselves, not detached (a fused copy is then a differentiable `torch.cat`, made at each
        build, so gradients reach every linear's own weight; no `scale`, no `refresh`)."""
        if trainable and scale is not None:
            raise ValueError("_Proj.of: a trainable projection folds no norm weight (an in-place copy)")
        keep = (lambda t: t) if trainable else Tensor.detach
        biases = [keep(m.bias) if m.bias is not None else None for m in linears]
        if not fuse:
            return cls([keep(m.weight).t() for m in linears], biases)
        weight = torch.cat([keep(m.weight) for m in linears], 0)
        if scale is not None:
            weight.mul_(scale)  # a fresh copy: the model is untouched
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [b if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, linears)]
            )
        return cls([weight.t()], [bias], None if trainable else (linears, scale))

    def refresh(self) -> None:
        """Remake a fused copy in place from the live weights (its storage, which a captured graph
        reads, is kept); views of the live weights need nothing."""
        if self.sources is None:
            return
        linears, scale = self.sources
        weight = self.weights[0].t()
        torch.cat([m.weight.detach() for m in linears], 0, out=weight)
        if scale is not None:
            weight.mul_(scale)
        bias = self.biases[0]
        if bias is not None:
            torch.cat(
                [
                    m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                    for m in linears
                ],
                out=bias,
            )

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if len(self.weights) == 1:
            return _linear(x, self.weights[0], self.biases[0], residual)
        return torch.cat(self.outputs(x), -1)

    def outputs(self, x: Tensor) -> list[Tensor]:
        """Each map's output, uncatenated: [x·Wᵀ + b] for a fused copy, one per linear otherwise
        (callers that split the concatenation again skip copying it)."""
        return [_linear(x, w, b) for w, b in zip(self.weights, self.biases)]


@dataclass
class _Layer:
    ln1: Tensor | None  # None: folded into qkv
    ln1_eps: float
    qkv: _Proj
    qk_norm: Tensor | None  # [Hq + Hkv, D]: q_norm's weight per query head, k_norm's per key head
    qk_norm_eps: float
    qk_norm_sources: tuple[Tensor, Tensor] | None  # (q_norm.weight, k_norm.weight), live
    o: _Proj
    ln2: Tensor | None  # None: folded into gate_up
    ln2_eps: float
    gate_up: _Proj
    down: _Proj


class LeanDecoder:
    """Prefill and one-token decode steps of a supported causal LM on a static KV cache.

    Built from the live model (check `lean_decoder_support` first). Use: `prefill(ids, mask,
    max_new_tokens)` -> last-position logits [B, V]; `repeat_interleave(g)` (G samples share the
    prefill); `select(rows)` (drop finished rows); `step(tokens)` -> logits [B', V] of the next
    position. Prompts may be padded on either side (the last valid token's logits are returned and
    the completion continues at each row's next position).
    """

    def __init__(self, model: nn.Module, trainable: bool = False) -> None:
        """trainable: read the parameters themselves, not detached copies or views, so `hidden`
        is differentiable in them (the student's forward, `trainable_student_decoder`); fused
        matrices are then `torch.cat`s made here (build one per forward) and no norm is folded."""
        config = model.config
        base = model.model
        # (no reference to `model` itself: a cached decoder must not keep its model alive)
        layers = list(base.layers)[: config.num_hidden_layers]
        attn0 = layers[0].self_attn
        keep = (lambda t: t) if trainable else Tensor.detach
        self.head_dim = int(attn0.head_dim)
        self.n_q = attn0.q_proj.out_features // self.head_dim
        self.n_kv = attn0.k_proj.out_features // self.head_dim
        self.scaling = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.embed = keep(base.embed_tokens.weight)
        self.padding_idx = base.embed_tokens.padding_idx  # (no gradient to that row, as nn.Embedding)
        self.norm, self.norm_eps = keep(base.norm.weight), base.norm.variance_epsilon
        self.head = _Proj.of([model.lm_head], fuse=False, trainable=trainable)
        self.rotary = base.rotary_emb
        fuse = config.hidden_size <= (TRAINABLE_FUSE_MAX_WIDTH if trainable else FUSE_MAX_WIDTH)
        # Fused copies of float32/64 models get the norms' weights folded in (W·diag(w), one op less
        # per norm, equal up to rounding); 16-bit models, and any model under autocast (whose
        # matmuls round their inputs to 16 bits: x·w then W, not x then W·w), keep the model's own
        # order of roundings. (Decoders are built under the autocast state they run in.)
        autocast = torch.is_autocast_enabled(self.embed.device.type)
        fold = fuse and self.embed.dtype in (torch.float32, torch.float64) and not autocast and not trainable
        self.layers: list[_Layer] = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = keep(layer.input_layernorm.weight), keep(layer.post_attention_layernorm.weight)
            qkv = _Proj.of([attn.q_proj, attn.k_proj, attn.v_proj], fuse, ln1 if fold else None, trainable)
            gate_up = _Proj.of([mlp.gate_proj, mlp.up_proj], fuse, ln2 if fold else None, trainable)
            qk_norm, qk_eps, qk_sources = None, 0.0, None
            if getattr(attn, "q_norm", None) is not None:
                qk_sources = (keep(attn.q_norm.weight), keep(attn.k_norm.weight))
                qk_norm = self._qk_norm(qk_sources)
                qk_eps = attn.q_norm.variance_epsilon
            self.layers.append(
                _Layer(
                    None if fold else ln1,
                    layer.input_layernorm.variance_epsilon,
                    qkv,
                    qk_norm,
                    qk_eps,
                    qk_sources,
                    _Proj.of([attn.o_proj], fuse=False, trainable=trainable),
                    None if fold else ln2,
                    layer.post_attention_layernorm.variance_epsilon,
                    gate_up,
                    _Proj.of([mlp.down_proj], fuse=False, trainable=trainable),
                )
            )
        self.gqa = self.n_q != self.n_kv
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None
        # `hidden`'s shared prompt prefixes (frozen decoders only: the weights must not change):
        # token ids -> each layer's keys and values [1, Hkv, P, D] and the final hidden states [1, P, H]
        self.trainable = trainable
        self.prefixes: OrderedDict[tuple[int, ...], tuple[list[tuple[Tensor, Tensor]], Tensor]] = (
            OrderedDict()
        )

    def _qk_norm(self, sources: tuple[Tensor, Tensor], out: Tensor | None = None) -> Tensor:
        q_norm, k_norm = sources
        return torch.cat([q_norm.expand(self.n_q, -1), k_norm.expand(self.n_kv, -1)], out=out)

    def refresh_copies(self) -> None:
        """Remake, in place, every copy of the weights made when the decoder was built (the fused
        q/k/v and gate/up matrices with their folded norms, the per-head q/k norms) from the live
        weights; everything else is a view of them. In place: their storage, which a captured graph
        reads, is kept. Cheap at the widths that fuse (`FUSE_MAX_WIDTH`)."""
        for layer in self.layers:
            layer.qkv.refresh()
            layer.gate_up.refresh()
            if layer.qk_norm_sources is not None:
                self._qk_norm(layer.qk_norm_sources, out=layer.qk_norm)

    # -- pieces ---------------------------------------------------------------------------------
    def _rope_tables(self, length: int) -> None:
        positions = torch.arange(length, device=self.embed.device)[None]
        cos, sin = self.rotary(self.embed[:1], position_ids=positions)  # the model's own rotary
        cos, sin = cos[0], sin[0]  # [L, D]
        half = self.head_dim // 2
        # rotate_half(x)·sin == roll(x, D/2)·(sin with its first half negated)
        self.cos, self.sin = cos, torch.cat([-sin[:, :half], sin[:, half:]], -1)

    def _qkv(self, layer: _Layer, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [..., H] -> q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D] (normed, rotated).

        cos, sin: [..., 1, D] (sin with its first half negated, see `_rope_tables`).
        """
        parts = layer.qkv.outputs(h)
        if len(parts) == 1:  # fused: q and k normed and rotated together
            qk, v = parts[0].split([(self.n_q + self.n_kv) * self.head_dim, self.n_kv * self.head_dim], -1)
            q, k = self._rotate(
                layer, qk.unflatten(-1, (self.n_q + self.n_kv, self.head_dim)), cos, sin
            ).split([self.n_q, self.n_kv], -2)
        else:  # the model's matrices: each apart (concatenating them would only copy)
            q, k, v = parts
            norms = (None, None) if layer.qk_norm is None else layer.qk_norm.split([self.n_q, self.n_kv])
            q = self._rotate(layer, q.unflatten(-1, (self.n_q, self.head_dim)), cos, sin, norms[0])
            k = self._rotate(layer, k.unflatten(-1, (self.n_kv, self.head_dim)), cos, sin, norms[1])
        return q, k, v.unflatten(-1, (self.n_kv, self.head_dim))

    def _rotate(
        self, layer: _Layer, x: Tensor, cos: Tensor, sin: Tensor, norm: Tensor | None = None
    ) -> Tensor:
        """Per-head q/k norm (`layer.qk_norm`, or its rows `norm` for q or k alone), then rotary
        embedding: x [..., heads, D]."""
        if layer.qk_norm is not None:
            x = _rms(x, layer.qk_norm if norm is None else norm, layer.qk_norm_eps)
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, -1), sin)

    def _mlp(self, layer: _Layer, x: Tensor) -> Tensor:
        h = _rms(x, layer.ln2, layer.ln2_eps)
        parts = layer.gate_up.outputs(h)
        gate, up = parts[0].chunk(2, -1) if len(parts) == 1 else parts
        return layer.down(F.silu(gate).mul_(up), residual=x)

    def _logits(self, x: Tensor) -> Tensor:
        return self.head(_rms(x, self.norm, self.norm_eps))

    def hidden(self, ids: Tensor, mask: Tensor | None = None, start: int = 0) -> Tensor:
        """Final-normed hidden states [B, T - start, H] of whole sequences ids [B, T] (mask: 1 =
        token, any padding side), as the model's forward without a cache or position ids computes
        them at the tokens: positions 0..T-1, causal attention over the tokens. Rows are computed
        from position 0 (the context), only positions start.. are normed and returned.

        On a CPU a prompt prefix that every row shares (the first columns holding the same tokens
        in every row, all of them tokens, at least `SHARED_PREFIX_MIN`: a chat template's system
        turn, a few-shot preamble) is computed once, for one row, and the other positions attend
        to it. A frozen decoder keeps its keys, values and hidden states (`SHARED_PREFIX_CACHE`
        prefixes, reused by later batches that share a part of one: positions attend only
        backwards, so a prefix's first m positions are those of any sequence starting with the
        same m tokens); a trainable one computes it per call, differentiably. (On a GPU, finding
        the prefix would read the batch back from the device: not done.)"""
        shared = self._shared_prefix(ids, mask)
        if shared is not None:
            return self._hidden_after_prefix(ids, mask, start, *shared)
        x, _ = self._layers_run(ids, mask, 0, None, keep_kv=False)
        return _rms(x[:, start:], self.norm, self.norm_eps)

    def _layers_run(
        self,
        ids: Tensor,
        mask: Tensor | None,
        offset: int,
        past: list[tuple[Tensor, Tensor]] | None,
        keep_kv: bool,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The layers over tokens ids [B, S] at positions offset.. offset + S - 1, attending to
        `past` (each layer's keys / values [1, Hkv, offset, D] of the positions before, shared by
        every row) and causally to each other; mask [B, offset + S] (1 = token) or None. Returns
        the residual stream [B, S, H] (not normed) and, if keep_kv, each layer's keys / values of
        these positions [B, Hkv, S, D]."""
        batch, width = ids.shape
        total = offset + width
        if self.cos is None or self.cos.shape[0] < total:
            self._rope_tables(total)
        assert self.cos is not None and self.sin is not None
        cos, sin = self.cos[offset:total, None], self.sin[offset:total, None]  # [S, 1, D]
        dtype, device = self.embed.dtype, ids.device
        # query i (position offset + i) sees keys j <= offset + i that are tokens; a query that
        # sees none sees itself (stays finite)
        allowed = torch.ones(width, total, dtype=torch.bool, device=device).tril(offset)
        if mask is not None:
            allowed = allowed & mask.to(torch.bool)[:, None, :]
            itself = F.pad(torch.eye(width, dtype=torch.bool, device=device), (offset, 0))  # key offset + i
            allowed = allowed | (itself & ~allowed.any(-1, keepdim=True))
        # additive float mask: SDPA on CPU runs about twice as fast with it as with a boolean one
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
        additive.masked_fill_(~allowed, float("-inf"))
        additive = additive[:, None] if mask is not None else additive
        # the residual stream as [B·S, H]: every linear one `mm` / `addmm` (with its residual)
        cos, sin = cos.repeat(batch, 1, 1), sin.repeat(batch, 1, 1)  # [B·S, 1, D]
        x = F.embedding(ids.flatten(), self.embed, self.padding_idx)
        kept: list[tuple[Tensor, Tensor]] = []
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, _rms(x, layer.ln1, layer.ln1_eps), cos, sin)
            q, k, v = (t.unflatten(0, (batch, width)).transpose(1, 2) for t in (q, k, v))
            if keep_kv:
                kept.append((k, v))
            if past is not None:
                past_k, past_v = past[index]
                k = torch.cat([past_k.expand(batch, -1, -1, -1), k], 2)
                v = torch.cat([past_v.expand(batch, -1, -1, -1), v], 2)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=additive, scale=self.scaling, enable_gqa=self.gqa
            )
            x = layer.o(out.transpose(1, 2).reshape(batch * width, -1), residual=x)
            x = self._mlp(layer, x)
        return x.unflatten(0, (batch, width)), kept

    def _shared_prefix(
        self, ids: Tensor, mask: Tensor | None
    ) -> tuple[int, list[tuple[Tensor, Tensor]], Tensor] | None:
        """(m, each layer's keys / values [1, Hkv, m, D], final hidden states [1, m, H]) of the
        prompt prefix every row of ids shares: a frozen decoder's from its kept prefixes or
        computed now and kept; a trainable decoder's computed now (its gradients flow back through
        every row's use of it). None when it is not worth sharing (or on a GPU)."""
        if ids.device.type != "cpu" or ids.shape[0] < 2 or (torch.is_grad_enabled() and not self.trainable):
            return None
        same = (ids == ids[:1]).all(0)
        if mask is not None:
            same &= mask.to(torch.bool).all(0)
        length = int(same.long().cumprod(0).sum())
        length = min(length, ids.shape[1] - 1)  # at least one position of each row computed per row
        if length < SHARED_PREFIX_MIN:
            return None
        if self.trainable:  # the weights change between calls: computed for one row, not kept
            x, kv = self._layers_run(ids[:1, :length], None, 0, None, keep_kv=True)
            return length, kv, _rms(x, self.norm, self.norm_eps)
        tokens = tuple(ids[0, :length].tolist())
        best, best_key = 0, None
        for key in self.prefixes:  # the kept prefix sharing the most leading tokens
            common = next((i for i, (a, b) in enumerate(zip(key, tokens)) if a != b), min(len(key), length))
            if common > best:
                best, best_key = common, key
        if best_key is None or best < length:  # compute this prefix for one row and keep it
            x, kv = self._layers_run(ids[:1, :length], None, 0, None, keep_kv=True)
            best_key, best = tokens, length
            self.prefixes[best_key] = (kv, _rms(x, self.norm, self.norm_eps))
            while len(self.prefixes) > SHARED_PREFIX_CACHE:
                self.prefixes.popitem(last=False)
        self.prefixes.move_to_end(best_key)
        kv, normed = self.prefixes[best_key]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in kv], normed[:, :best]

    def _hidden_after_prefix(
        self,
        ids: Tensor,
        mask: Tensor | None,
        start: int,
        length: int,
        past: list[tuple[Tensor, Tensor]],
        prefix_hidden: Tensor,
    ) -> Tensor:
        """`hidden` with the first `length` positions (shared by every row) given: their keys /
        values `past` and final hidden states prefix_hidden [1, length, H]."""
        x, _ = self._layers_run(ids[:, length:], mask, length, past, keep_kv=False)
        if start >= length:
            return _rms(x[:, start - length :], self.norm, self.norm_eps)
        rest = _rms(x, self.norm, self.norm_eps)
        return torch.cat([prefix_hidden.expand(ids.shape[0], -1, -1), rest], 1)[:, start:]

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head's logits of final-normed hidden states (`hidden`): [..., V]."""
        return self.head(hidden)

    # -- the decode API -------------------------------------------------------------------------
    def _new_cache(self, rows: int, length: int, device: torch.device) -> None:
        """A zeroed KV cache [rows, Hkv, length, D] per layer, the attention mask `visible` [rows,
        length] all -inf, and the rope tables for positions < length."""
        self._rope_tables(length)
        dtype = self.embed.dtype
        shape = (rows, self.n_kv, length, self.head_dim)
        # zeros, not empty: `StaticStepDecoder` attends over the whole cache (masked), and uninitialised
        # memory could hold NaN / inf, which a -inf mask does not cancel (NaN + -inf = NaN, 0 · inf = NaN)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        # additive attention mask over the cache: 0 = a token to attend to, -inf = padding / not yet
        self.visible = torch.full((rows, length), float("-inf"), dtype=dtype, device=device)

    def prefill(self, ids: Tensor, mask: Tensor, max_new_tokens: int, repeats: int = 1) -> Tensor:
        """Run the prompts [B, P] (mask [B, P], 1 = token) into a fresh cache of B·repeats rows
        (rows i·repeats .. i·repeats + repeats - 1 continue prompt i: the G samples of a prompt share
        its prefill): last-position logits [B·repeats, V]."""
        batch, width = ids.shape
        mask = mask.to(device=ids.device, dtype=torch.bool)
        self.width, self.step_index = width, 0
        dtype, device = self.embed.dtype, ids.device
        self._new_cache(batch * repeats, width + max_new_tokens, device)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        self.visible.unflatten(0, (batch, repeats))[:, :, :width].masked_fill_(mask[:, None], 0.0)
        # causal ∧ key is a token; a query always sees itself (padding rows stay finite)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = (causal & mask[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
        # additive float mask: SDPA on CPU runs about twice as fast with it as with a boolean one
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        allowed = allowed[:, None]
        cos, sin = self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)  # [B, P, 1, D]
        x = F.embedding(ids, self.embed)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = self._qkv(layer, _rms(x, layer.ln1, layer.ln1_eps), cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, P, D]
            keys.unflatten(0, (batch, repeats))[:, :, :, :width] = k[:, None]  # (in place, each sample)
            values.unflatten(0, (batch, repeats))[:, :, :, :width] = v[:, None]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.scaling, enable_gqa=self.gqa
            )
            x = layer.o(out.transpose(1, 2).flatten(2), residual=x)
            x = self._mlp(layer, x)
        last = (mask.long() * torch.arange(width, device=device)).argmax(-1)  # last token of each row
        rows = torch.arange(batch, device=device)
        self.next_pos = positions[rows, last] + 1
        logits = self._logits(x[rows, last])
        if repeats > 1:
            self.next_pos = self.next_pos.repeat_interleave(repeats, 0)
            logits = logits.repeat_interleave(repeats, 0)
        return logits

    def repeat_interleave(self, repeats: int) -> None:
        """Each row repeated `repeats` times consecutively (G samples share one prefill)."""
        self.keys = [k.repeat_interleave(repeats, 0) for k in self.keys]
        self.values = [v.repeat_interleave(repeats, 0) for v in self.values]
        self.visible = self.visible.repeat_interleave(repeats, 0)
        self.next_pos = self.next_pos.repeat_interleave(repeats, 0)

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (indices into the current batch) in the batch and the cache."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.visible, self.next_pos = self.visible[rows], self.next_pos[rows]

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row [B] (at each row's next position): logits [B, V] for the next."""
        slot = self.width + self.step_index
        if slot >= self.visible.shape[1]:
            raise RuntimeError(
                f"LeanDecoder: more decode steps than the {self.visible.shape[1] - self.width} prepared"
            )
        self.step_index += 1
        batch = tokens.shape[0]
        self.visible[:, slot] = 0.0
        visible = self.visible[:, None, None, : slot + 1]
        cos, sin = self.cos[self.next_pos].unsqueeze(-2), self.sin[self.next_pos].unsqueeze(-2)  # [B, 1, D]
        x = F.embedding(tokens, self.embed)
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = self._qkv(layer, _rms(x, layer.ln1, layer.ln1_eps), cos, sin)
            keys[:, :, slot] = k
            values[:, :, slot] = v
            out = F.scaled_dot_product_attention(
                q[:, :, None],
                keys[:, :, : slot + 1],
                values[:, :, : slot + 1],
                attn_mask=visible,
                scale=self.scaling,
                enable_gqa=self.gqa,
            )
            x = layer.o(out.view(batch, -1), residual=x)
            x = self._mlp(layer, x)
        self.next_pos = self.next_pos + 1
        return self._logits(x)


class StaticStepDecoder(LeanDecoder):
    """`LeanDecoder` with a fixed-shape decode step, captured in a CUDA graph on CUDA devices.

    On a GPU a decode step of a small model is kernel-launch overhead (~250-400 launches per token
    for the arithmetic student), which one `CUDAGraph.replay()` removes. A graph replays the same
    kernels on the same memory, so nothing in the step may change shape or depend on a Python value
    that changes per step:

    - the batch keeps all its rows: `select(rows)` only records which rows are still wanted;
      `step(tokens)` takes the tokens of those rows, scatters them into the full static batch
      (finished rows re-feed their last token; their results are ignored) and returns the logits
      of those rows only, so the sampling loop is the same as with `LeanDecoder`;
    - attention runs over the whole cache length with the additive mask `visible` (-inf on padding
      and on slots not written yet; the cache is zero-initialised so unwritten slots are finite),
      the current slot unmasked in place;
    - the cache slot and each row's position live in device tensors advanced in place.

    Its buffers are persistent: the first `prefill` fixes the shape (rows = prompts × repeats, cache
    length) and allocates the cache, `visible`, the rope tables and the step's inputs; every later
    `prefill` (same shape, else ValueError) writes into the same storage, which is what lets
    `static_step_decoder` keep one decoder, and its captured graph, across sampling calls. The weights
    it reads are views of the live parameters (updated in place by an optimizer step) or copies
    remade in place at each later `prefill` (`refresh_copies`: the fused matrices), so a replay always
    computes with the current weights; a replaced parameter storage is `static_step_decoder`'s to
    detect (it builds a new decoder).

    The graph is captured at the decoder's first `step`: warm-up on a side stream, capture, then a
    replay per step with the tokens copied into the static input buffer. A capture that fails falls
    back to running the same step eagerly, the reason logged once at debug level. graph=False runs
    the fixed-shape step eagerly (what CPUs do: they have no graphs).

    compile=True: wherever the step runs eagerly (no graph: CPUs), it runs through `torch.compile`
    (`run_compiled`: inductor, `fullgraph`, static shapes; `sample_tokens` compiles the token draw
    with it), and so does every prefill after the first (which allocates the buffers): the ~400
    small ops of a step fused into a few dozen kernels. Compiling costs seconds
    to a minute per new decoder shape at the first step (torch's on-disk cache shortens it in
    later processes; decoders of the same shape share the compiled code, as its guards are on tensor
    shapes, not identities), so it pays on long runs of small models. Without a graph the cache is
    written at the slot only (`index_copy_`) and attention is one SDPA call. A compile that fails
    (no C++ compiler, an unsupported op) falls back to the eager step, the reason logged once at
    debug level.
    """

    # eager runs on the capture stream before each capture (cuBLAS handles and workspaces, lazily
    # loaded kernels: nothing may be initialised during capture); one per capture suffices, the
    # stream being one per device for the process
    WARMUP_STEPS = 1

    def __init__(self, model: nn.Module, graph: bool = True, compile: bool = False) -> None:
        super().__init__(model)
        self.graph_wanted = graph
        self.compile_wanted = compile
        self.compile_failed: str | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_failed: str | None = None
        self.groups = self.n_q // self.n_kv
        self.keys: list[Tensor] | None = None  # allocated by the first prefill, then reused
        self.prefills = 0
        self.storages: tuple[int, ...] = ()  # `_storages(model)` when `static_step_decoder` built it

    def _new_cache(self, rows: int, length: int, device: torch.device) -> None:
        if self.keys is None:
            super()._new_cache(rows, length, device)
            self.every_row = torch.arange(rows, device=device)
            self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
            self.slot = torch.zeros(1, dtype=torch.long, device=device)
            self.static_next_pos = torch.zeros(rows, dtype=torch.long, device=device)
            self.cache_index = torch.arange(length, device=device)
            return
        if (rows, length) != tuple(self.visible.shape) or device != self.visible.device:
            raise ValueError(
                f"StaticStepDecoder: built for {self.visible.shape[0]} rows x cache length "
                f"{self.visible.shape[1]} on {self.visible.device}, asked for {rows} x {length} on {device}"
            )
        for cache in (*self.keys, *self.values):
            cache.zero_()
        self.visible.fill_(float("-inf"))

    def prefill(self, ids: Tensor, mask: Tensor, max_new_tokens: int, repeats: int = 1) -> Tensor:
        if self.prefills:  # built from the weights as they were then: refresh the copies
            self.refresh_copies()
        self.prefills += 1
        if self.prefills > 1:  # the buffers exist (the first prefill allocates them): fixed shapes
            logits = self.run_compiled(LeanDecoder.prefill, self, ids, mask, max_new_tokens, repeats)
        else:
            logits = super().prefill(ids, mask, max_new_tokens, repeats)
        self.next_pos = self.static_next_pos.copy_(self.next_pos)
        self.slot.fill_(self.width)
        self.rows = self.every_row  # the full-batch rows still wanted
        self.all_rows = True
        return logits

    def repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("StaticStepDecoder: pass repeats to prefill (its batch shape is fixed)")

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (indices into the rows still wanted) in the output; the batch keeps them all."""
        self.rows = self.rows[rows]
        self.all_rows = False

    def begin_step(self) -> None:
        """Count one decode step, refusing more than the cache was prepared for."""
        if self.width + self.step_index >= self.visible.shape[1]:
            raise RuntimeError(
                f"StaticStepDecoder: more decode steps than the {self.visible.shape[1] - self.width} prepared"
            )
        self.step_index += 1

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per wanted row [B'] (at its next position): logits [B', V] for the next."""
        self.begin_step()
        if self.all_rows:
            self.tokens.copy_(tokens)
        else:  # finished rows keep their last token (their logits are not returned)
            self.tokens.index_copy_(0, self.rows, tokens)
        if self.graph is None and self.graph_wanted and self.graph_failed is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits
        else:
            logits = self.run_compiled(StaticStepDecoder._fixed_step, self)
        return logits.index_select(0, self.rows)  # a copy: the next replay overwrites graph_logits

    @property
    def compiles(self) -> bool:
        """Whether `run_compiled` compiles: asked for, no CUDA graph wanted (a graph replays the step
        on CUDA devices), no compile failed."""
        return self.compile_wanted and not self.graph_wanted and self.compile_failed is None

    def run_compiled(self, fn: Callable[..., Tensor], *args: object) -> Tensor:
        """`fn(*args)` (a function that runs `_fixed_step`, e.g. with the sampling around it) through
        `torch.compile` when `compiles`, else eagerly. Compiled at its first call (fullgraph, static
        shapes) and kept per function: its guards are on tensor shapes, so decoders of one shape
        share the compiled code. A compile that fails (raised while tracing or compiling, before
        anything ran) logs its reason once and `fn` runs eagerly from then on."""
        if not self.compiles:
            return fn(*args)
        compiled = _compiled_functions.get(fn)
        if compiled is None:
            # the C++ wrapper calls the kernels without the Python one's per-call costs (~20% of
            # a small model's step on a CPU); size asserts re-check what the guards have checked
            options = {"cpp_wrapper": True, "size_asserts": False}
            compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=options)
            _compiled_functions[fn] = compiled
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compile failure: run the step eagerly
            first_line = str(error).splitlines()[0] if str(error) else ""
            self.compile_failed = f"{type(error).__name__}: {first_line}"
            _log_once(f"torch.compile of the decode step failed, decoding eagerly: {self.compile_failed}")
            return fn(*args)

    def _fixed_step(self) -> Tensor:
        """One decode step of the whole static batch: reads `tokens`, writes the cache at `slot`,
        advances `slot` and `next_pos` in place; logits [B, V].

        The form a CUDA graph captures (`graph_wanted`) has only elementwise, matmul, softmax and
        index_select kernels: `index_copy_` / `index_put_` would run torch's deterministic variant
        under `torch.use_deterministic_algorithms` (kdkit's GPU training default), which checks
        index bounds on the host, a sync that breaks capture. The eager / compiled form writes the
        cache at the slot with `index_copy_` and attends with one SDPA call.
        """
        at_slot = self.cache_index == self.slot  # [L] bool: the cache slot this step writes
        self.visible.masked_fill_(at_slot, 0.0)
        visible = self.visible[:, None, None, :]  # [B, 1, 1, L]
        # [L, 1]: 1 at the slot, 0 elsewhere (the captured form's cache write)
        write = at_slot.to(self.visible.dtype)[:, None] if self.graph_wanted else None
        cos = self.cos.index_select(0, self.next_pos).unsqueeze(-2)  # [B, 1, D]
        sin = self.sin.index_select(0, self.next_pos).unsqueeze(-2)
        x = F.embedding(self.tokens, self.embed)
        batch = x.shape[0]
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            q, k, v = self._qkv(layer, _rms(x, layer.ln1, layer.ln1_eps), cos, sin)
            # grouped-query attention as [B, Hkv, groups, D] queries (query head h reads key/value
            # head h // groups); under autocast k / v come out in the autocast dtype, the cache
            # keeps the model's
            q = q.reshape(batch, self.n_kv, self.groups, self.head_dim)
            if self.graph_wanted:
                # cache + write·(new − cache): exactly the new k / v at the slot (lerp's weight-1
                # branch returns `end`), the cache untouched elsewhere (finite: the cache starts at 0)
                keys.lerp_(k.unsqueeze(2).to(keys.dtype), write)
                values.lerp_(v.unsqueeze(2).to(values.dtype), write)
                # plain matmul / softmax kernels, with no SDPA backend choice to depend on under capture
                scores = torch.add(visible, torch.matmul(q, keys.transpose(-1, -2)), alpha=self.scaling)
                if scores.dtype in (torch.float32, torch.float64):
                    probs = torch.softmax(scores, -1)
                else:  # 16-bit: softmax in float32, as the models' eager attention does
                    probs = torch.softmax(scores, -1, dtype=torch.float32).to(scores.dtype)
                out = torch.matmul(probs, values)  # [B, Hkv, groups, D]
            else:
                # no graph to break: write only the slot, and one SDPA kernel (which torch.compile
                # keeps as one; its decomposed matmul-softmax-matmul recomputes scores per output)
                keys.index_copy_(2, self.slot, k.unsqueeze(2).to(keys.dtype))
                values.index_copy_(2, self.slot, v.unsqueeze(2).to(values.dtype))
                out = F.scaled_dot_product_attention(
                    q.to(keys.dtype), keys, values, attn_mask=visible.to(keys.dtype), scale=self.scaling
                )
            x = layer.o(out.view(batch, -1), residual=x)
            x = self._mlp(layer, x)
        self.next_pos.add_(1)
        self.slot.add_(1)
        return self._logits(x)

    def _capture(self) -> None:
        """Capture `_fixed_step` into a CUDA graph (torch's recipe: warm-up on a side stream, then
        capture on it). Warm-up runs change only the current slot (rewritten with the same values
        by the first replay) and the counters, which are restored."""
        if self.tokens.device.type != "cuda":
            self.graph_failed = f"device {self.tokens.device} has no CUDA graphs"
            _log_once(f"no CUDA graph, decoding eagerly: {self.graph_failed}")
            return
        # Under autocast (bf16 mixed-precision training samples inside the step) the casts of the
        # weights must be recorded in the graph: autocast's cache of cast weights lives only until
        # its context exits, so a graph reading cached copies would replay on freed memory.
        autocast = torch.is_autocast_enabled("cuda")
        no_cache = torch.autocast(
            "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False
        )
        with torch.cuda.device(self.tokens.device), no_cache:
            self._capture_on_device()

    def _capture_on_device(self) -> None:
        next_pos, slot = self.next_pos.clone(), self.slot.clone()
        stream = _capture_stream(self.tokens.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_STEPS):
                self._fixed_step()
                self.next_pos.copy_(next_pos)
                self.slot.copy_(slot)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin/end rather than `torch.cuda.graph`, whose entry runs gc.collect() and
            # empties torch's CUDA cache: at one capture per new decoder shape that would cost the
            # training step its cached blocks (and tens of ms of garbage collection) every step
            with torch.cuda.stream(stream):  # restores the caller's stream even if capture_end raises
                graph.capture_begin()
                try:
                    logits = self._fixed_step()
                finally:
                    graph.capture_end()
        except Exception as error:  # noqa: BLE001 - any capture failure: run the step eagerly
            self.graph_failed = f"{type(error).__name__}: {error}"
            self.next_pos.copy_(next_pos)  # (capture records, it does not run; restored to be safe)
            self.slot.copy_(slot)
            _log_once(f"CUDA graph capture failed, decoding eagerly: {self.graph_failed}")
            return
        self.graph, self.graph_logits = graph, logits


_capture_streams: dict[int, torch.cuda.Stream] = {}
# `StaticStepDecoder.run_compiled`'s compiled functions, one per function
_compiled_functions: dict[Callable[..., Tensor], Callable[..., Tensor]] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per CUDA device for warm-ups and captures (a new stream per capture would
    allocate a new cuBLAS workspace each time)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.Stream(device=index)
    return _capture_streams[index]


# Decoders kept per model by `static_step_decoder`, the least recently used dropped first. Each holds
# its KV cache (rows x cache length x layers) and, on CUDA, its graph's memory pool.
GRAPH_CACHE_SIZE = 3
# Cache lengths are rounded up to a multiple of this (by extra left padding, which the mask hides), so
# batches whose prompt widths differ a little share a decoder. Each decode step attends over the whole
# cache, so the rounding costs at most CACHE_BUCKET - 1 masked slots per token: nothing at the widths
# where graphs pay (launch-bound steps), a few % of the attention at long caches.
CACHE_BUCKET = 32

_decoders: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, StaticStepDecoder]] = (
    weakref.WeakKeyDictionary()
)
_cache_counts = {"hits": 0, "misses": 0, "rebuilds": 0}


def cache_length(width: int, max_new_tokens: int) -> int:
    """The fixed-shape cache length for prompts of `width` and `max_new_tokens`: their sum rounded up
    to a multiple of `CACHE_BUCKET`."""
    return -(-(width + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET


def _storages(model: nn.Module) -> tuple[int, ...]:
    """Where every parameter (and the rotary buffers) lives: any change means a storage the decoder
    reads was replaced (`load_state_dict(assign=True)`, `param.data = ...`, `model.to(...)`). (A
    decoder holds views of the old storages, so a new one can never reuse their addresses.)"""
    rotary = model.model.rotary_emb
    return tuple(t.data_ptr() for t in (*model.parameters(), *rotary.buffers()))


def static_step_decoder(
    model: nn.Module, rows: int, length: int, device: torch.device, graph: bool, compile: bool = False
) -> StaticStepDecoder:
    """A `StaticStepDecoder` of `model` for `rows` rows (prompts × samples) and cache `length`
    (`cache_length`), reused across calls: its buffers and captured CUDA graph are kept, per model
    (weakly: a deleted model frees its decoders), for the last `GRAPH_CACHE_SIZE` distinct keys. The
    key holds everything the captured kernels depend on: rows, length, device, the model's dtype,
    autocast's state and dtype, inference mode, deterministic algorithms, graph or eager, compiled or
    not (`StaticStepDecoder`'s `compile`). A decoder
    whose model had a parameter storage replaced since it was built is rebuilt (with every other
    decoder of that model); in-place updates (optimizer steps) are read live (see `StaticStepDecoder`).
    Counts of hits / misses / rebuilds: `decoder_cache_info`."""
    kind = device.type
    key = (
        rows,
        length,
        str(device),
        model.model.embed_tokens.weight.dtype,
        torch.is_autocast_enabled(kind),
        torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None,
        torch.is_inference_mode_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        graph,
        compile,
    )
    storages = _storages(model)
    kept = _decoders.get(model)
    if kept is None:
        kept = _decoders[model] = OrderedDict()
    decoder = kept.get(key)
    if decoder is not None and decoder.storages == storages:
        _cache_counts["hits"] += 1
        kept.move_to_end(key)
        return decoder
    if any(d.storages != storages for d in kept.values()):  # stale weights: drop them all, free memory
        _cache_counts["rebuilds"] += 1
        kept.clear()
    else:
        _cache_counts["misses"] += 1
    decoder = StaticStepDecoder(model, graph=graph, compile=compile)
    decoder.storages = storages
    kept[key] = decoder
    while len(kept) > GRAPH_CACHE_SIZE:
        kept.popitem(last=False)
    return decoder


def decoder_cache_info(model: nn.Module | None = None) -> dict[str, int]:
    """Counts since the process started (or `clear_decoder_cache`): hits (a kept decoder reused),
    misses (a new key), rebuilds (a parameter storage replaced); `kept`: decoders held now, for
    `model` or all models."""
    held = [_decoders.get(model) or {}] if model is not None else list(_decoders.values())
    return {**_cache_counts, "kept": sum(len(k) for k in held)}


def clear_decoder_cache() -> None:
    """Drop every kept decoder (and its graph) and reset the counts."""
    _decoders.clear()
    for name in _cache_counts:
        _cache_counts[name] = 0


_logged: set[str] = set()


def _log_once(message: str, topic: str = "sampling") -> None:
    if message not in _logged:
        _logged.add(message)
        logger.debug("kdkit %s: %s", topic, message)


_FROZEN: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, LeanDecoder | None]] = weakref.WeakKeyDictionary()


def frozen_teacher_decoder(model: nn.Module, device_type: str) -> LeanDecoder | None:
    """A `LeanDecoder` of a frozen (eval-mode) `model` for `LeanDecoder.hidden`, or None where the
    model's own forward must run: an unsupported model (`lean_decoder_support`), training mode,
    or autocast on `device_type` (Hugging Face's layers keep a float32 residual stream under
    autocast; these would not).

    Built once and kept while the parameters are the same tensors, unmodified (their storage and
    version counters are compared on each call), so a teacher moved to another device or
    changed in place is read again.
    """
    if model.training or torch.is_autocast_enabled(device_type):
        return None
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())
    cached = _FROZEN.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    decoder = LeanDecoder(model) if lean_decoder_support(model) is None else None
    _FROZEN[model] = (key, decoder)
    return decoder


#: Set to 0 / false / off to run the student's own forward in training (`trainable_student_decoder`).
LEAN_STUDENT_ENV = "KDKIT_LEAN_STUDENT"


def trainable_student_decoder(model: nn.Module, device_type: str) -> LeanDecoder | None:
    """A trainable `LeanDecoder` of `model` (built per call: it reads the live parameters, and
    `hidden` / `logits` are differentiable in them) when it computes exactly the model's forward,
    else None (the reason logged once at debug level) where the model's own forward must run:
    `KDKIT_LEAN_STUDENT=0`, anything `lean_decoder_support` refuses (other families, subclasses,
    hooks: PEFT, Opacus, accelerate; dynamic RoPE; sliding windows; attention dropout in training
    mode, the only dropout these families have), gradient checkpointing, or autocast on
    `device_type` (the model keeps a float32 residual stream and float32 norms under autocast)."""
    if os.environ.get(LEAN_STUDENT_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        reason: str | None = f"{LEAN_STUDENT_ENV} is off"
    elif torch.is_autocast_enabled(device_type):
        reason = "autocast is on"
    else:
        reason = lean_decoder_support(model)
    if reason is None:  # (a supported transformers model: `is_gradient_checkpointing` before 5.x)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        reason = "gradient checkpointing is on" if checkpointing else None
    if reason is not None:
        _log_once(f"the model's own forward runs: {reason}", "student forward")
        return None
    return LeanDecoder(model, trainable=True)


__all__ = [
    "CACHE_BUCKET",
    "LEAN_STUDENT_ENV",
    "GRAPH_CACHE_SIZE",
    "SUPPORTED",
    "LeanDecoder",
    "StaticStepDecoder",
    "cache_length",
    "clear_decoder_cache",
    "decoder_cache_info",
    "frozen_teacher_decoder",
    "lean_decoder_support",
    "static_step_decoder",
    "trainable_student_decoder",
]
