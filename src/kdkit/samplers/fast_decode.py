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

`LeanDecoder.hidden` runs the same layers over whole sequences (no cache, no gradient): the live
teacher signals use it for a frozen teacher (`frozen_teacher_decoder`), whose weights it reads
once and keeps while the teacher's parameters stay the same, unmodified tensors.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def _linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    """residual + x·Wᵀ + b with W given transposed ([in, out]): one `addmm` per step for 2-D x."""
    if x.dim() == 2:
        if residual is not None:
            out = torch.addmm(residual, x, weight_t)
            return out if bias is None else out.add_(bias)
        return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    out = torch.matmul(x, weight_t)
    if bias is not None:
        out = out + bias
    return out if residual is None else residual + out


# Up to this model width the q/k/v and gate/up weights are concatenated into one matmul each (a
# copy per sampling call, with the preceding norm's weight folded in, in float32): at small widths a
# decode step is dispatch overhead and one matmul beats three. Above it the copy costs more than the
# dispatches it saves (SmolLM2's 576: ~0.1 s of copies per call), so the model's own matrices are used.
FUSE_MAX_WIDTH = 256


@dataclass
class _Proj:
    """x -> the concatenated outputs of one or more linear maps (weights transposed: [in, out])."""

    weights: list[Tensor]
    biases: list[Tensor | None]

    @classmethod
    def of(cls, linears: list[nn.Linear], fuse: bool, scale: Tensor | None = None) -> _Proj:
        """The maps of `linears`: one concatenated copy when `fuse` (input columns times `scale`,
        the folded norm weight), else views of the live weights."""
        biases = [m.bias.detach() if m.bias is not None else None for m in linears]
        if not fuse:
            return cls([m.weight.detach().t() for m in linears], biases)
        weight = torch.cat([m.weight.detach() for m in linears], 0)
        if scale is not None:
            weight.mul_(scale)  # a fresh copy: the model is untouched
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [b if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, linears)]
            )
        return cls([weight.t()], [bias])

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if len(self.weights) == 1:
            return _linear(x, self.weights[0], self.biases[0], residual)
        return torch.cat([_linear(x, w, b) for w, b in zip(self.weights, self.biases)], -1)


@dataclass
class _Layer:
    ln1: Tensor | None  # None: folded into qkv
    ln1_eps: float
    qkv: _Proj
    qk_norm: Tensor | None  # [Hq + Hkv, D]: q_norm's weight per query head, k_norm's per key head
    qk_norm_eps: float
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

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        base = model.model
        self.model = model
        layers = list(base.layers)[: config.num_hidden_layers]
        attn0 = layers[0].self_attn
        self.head_dim = int(attn0.head_dim)
        self.n_q = attn0.q_proj.out_features // self.head_dim
        self.n_kv = attn0.k_proj.out_features // self.head_dim
        self.scaling = float(getattr(attn0, "scaling", self.head_dim**-0.5))
        self.embed = base.embed_tokens.weight.detach()
        self.norm, self.norm_eps = base.norm.weight.detach(), base.norm.variance_epsilon
        self.head = _Proj.of([model.lm_head], fuse=False)
        self.rotary = base.rotary_emb
        fuse = config.hidden_size <= FUSE_MAX_WIDTH
        # Fused copies of float32/64 models get the norms' weights folded in (W·diag(w), one op less
        # per norm, equal up to rounding); 16-bit models keep the model's own order of roundings.
        fold = fuse and self.embed.dtype in (torch.float32, torch.float64)
        self.layers: list[_Layer] = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()
            qkv = _Proj.of([attn.q_proj, attn.k_proj, attn.v_proj], fuse, ln1 if fold else None)
            gate_up = _Proj.of([mlp.gate_proj, mlp.up_proj], fuse, ln2 if fold else None)
            qk_norm, qk_eps = None, 0.0
            if getattr(attn, "q_norm", None) is not None:
                qk_norm = torch.cat(
                    [
                        attn.q_norm.weight.detach().expand(self.n_q, -1),
                        attn.k_norm.weight.detach().expand(self.n_kv, -1),
                    ]
                )
                qk_eps = attn.q_norm.variance_epsilon
            self.layers.append(
                _Layer(
                    None if fold else ln1,
                    layer.input_layernorm.variance_epsilon,
                    qkv,
                    qk_norm,
                    qk_eps,
                    _Proj.of([attn.o_proj], fuse=False),
                    None if fold else ln2,
                    layer.post_attention_layernorm.variance_epsilon,
                    gate_up,
                    _Proj.of([mlp.down_proj], fuse=False),
                )
            )
        self.gqa = self.n_q != self.n_kv
        self.cos: Tensor | None = None
        self.sin: Tensor | None = None

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
        qk, v = layer.qkv(h).split([(self.n_q + self.n_kv) * self.head_dim, self.n_kv * self.head_dim], -1)
        qk = qk.unflatten(-1, (self.n_q + self.n_kv, self.head_dim))
        if layer.qk_norm is not None:
            qk = _rms(qk, layer.qk_norm, layer.qk_norm_eps)
        qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, -1), sin)
        q, k = qk.split([self.n_q, self.n_kv], -2)
        return q, k, v.unflatten(-1, (self.n_kv, self.head_dim))

    def _mlp(self, layer: _Layer, x: Tensor) -> Tensor:
        h = _rms(x, layer.ln2, layer.ln2_eps)
        gate, up = layer.gate_up(h).chunk(2, -1)
        return layer.down(F.silu(gate).mul_(up), residual=x)

    def _logits(self, x: Tensor) -> Tensor:
        return self.head(_rms(x, self.norm, self.norm_eps))

    # -- the decode API -------------------------------------------------------------------------
    def prefill(self, ids: Tensor, mask: Tensor, max_new_tokens: int) -> Tensor:
        """Run the prompts [B, P] (mask [B, P], 1 = token) into a fresh cache: logits [B, V]."""
        batch, width = ids.shape
        mask = mask.to(device=ids.device, dtype=torch.bool)
        self.width, self.step_index = width, 0
        length = width + max_new_tokens
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        self._rope_tables(int(positions.max()) + max_new_tokens + 1)
        dtype, device = self.embed.dtype, ids.device
        shape = (batch, self.n_kv, length, self.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        # additive attention mask over the cache: 0 = a token to attend to, -inf = padding / not yet
        self.visible = torch.full((batch, length), float("-inf"), dtype=dtype, device=device)
        self.visible[:, :width].masked_fill_(mask, 0.0)
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
            keys[:, :, :width] = k
            values[:, :, :width] = v
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.scaling, enable_gqa=self.gqa
            )
            x = layer.o(out.transpose(1, 2).flatten(2), residual=x)
            x = self._mlp(layer, x)
        last = (mask.long() * torch.arange(width, device=device)).argmax(-1)  # last token of each row
        rows = torch.arange(batch, device=device)
        self.next_pos = positions[rows, last] + 1
        return self._logits(x[rows, last])

    def hidden(self, ids: Tensor, mask: Tensor | None = None, start: int = 0) -> Tensor:
        """Final-normed hidden states [B, T - start, H] of whole sequences ids [B, T] (mask: 1 =
        token, any padding side), as the model's forward without a cache or position ids computes
        them at the tokens: positions 0..T-1, causal attention over the tokens. Rows are computed
        from position 0 (the context), only positions start.. are normed and returned."""
        width = ids.shape[1]
        if self.cos is None or self.cos.shape[0] < width:
            self._rope_tables(width)
        assert self.cos is not None and self.sin is not None
        cos, sin = self.cos[:width, None], self.sin[:width, None]  # [T, 1, D], broadcast over rows
        dtype, device = self.embed.dtype, ids.device
        allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        if mask is not None:  # keys that are tokens; a query that sees none sees itself (stays finite)
            allowed = allowed & mask.to(torch.bool)[:, None, :]
            alone = torch.eye(width, dtype=torch.bool, device=device) & ~allowed.any(-1, keepdim=True)
            allowed = allowed | alone
        # additive float mask: SDPA on CPU runs about twice as fast with it as with a boolean one
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
        additive.masked_fill_(~allowed, float("-inf"))
        additive = additive[:, None] if mask is not None else additive
        x = F.embedding(ids, self.embed)
        for layer in self.layers:
            q, k, v = self._qkv(layer, _rms(x, layer.ln1, layer.ln1_eps), cos, sin)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=additive, scale=self.scaling, enable_gqa=self.gqa,
            )
            x = layer.o(out.transpose(1, 2).flatten(2), residual=x)
            x = self._mlp(layer, x)
        return _rms(x[:, start:], self.norm, self.norm_eps)

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head's logits of final-normed hidden states (`hidden`): [..., V]."""
        return self.head(hidden)

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


__all__ = ["SUPPORTED", "LeanDecoder", "frozen_teacher_decoder", "lean_decoder_support"]
