"""Per-layer features of a Hugging Face transformer in one forward pass: hidden states, attention
probabilities, and each block's attention-module and feed-forward-module outputs (forward hooks).

Works for encoders (BERT, MiniLM: `attention.output.dense`, `output.dense`) and decoders (Llama,
Qwen: `self_attn`, `mlp`; GPT-2: `attn`, `mlp`), factorised or not: a `LowRankLinear` that replaced
`output.dense` is hooked the same way. Attention probabilities need the eager attention kernel;
`transformer_features` switches a model to it when asked for attentions (the math is the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.models.builders import layer_stack
from kdkit.models.hooks import FeatureHooks

# Inside one transformer block: the attention block's and the feed-forward block's output modules,
# i.e. their contribution before the residual add (first match wins).
ATTENTION_OUT = ("attention.output.dense", "self_attn", "attn", "attention")
FFN_OUT = ("output.dense", "mlp", "feed_forward", "ffn")


@dataclass
class TransformerFeatures:
    """One forward pass. logits: the model's output logits ([B, C] or [B, T, V]); hidden_states:
    L + 1 tensors [B, T, D] (embeddings first); attentions: L tensors [B, H, T, T] (empty unless
    asked); attention_out, ffn_out: L tensors [B, T, D] (empty unless asked)."""

    logits: Tensor
    hidden_states: list[Tensor] = field(default_factory=list)
    attentions: list[Tensor] = field(default_factory=list)
    attention_out: list[Tensor] = field(default_factory=list)
    ffn_out: list[Tensor] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[Tensor]]:
        return {
            "hidden_states": self.hidden_states,
            "attentions": self.attentions,
            "attention_out": self.attention_out,
            "ffn_out": self.ffn_out,
        }


def block_module_names(model: nn.Module, candidates: Sequence[str]) -> list[str]:
    """The qualified name of one submodule per transformer block, the first of `candidates` that
    block has (e.g. ["bert.encoder.layer.0.output.dense", ...]). Raises naming what exists."""
    prefix, layers = layer_stack(model)
    names = []
    for index, layer in enumerate(layers):
        own = dict(layer.named_modules())
        found = next((c for c in candidates if c in own), None)
        if found is None:
            raise ValueError(
                f"{type(model).__name__} block {index} has none of {list(candidates)} "
                f"(its submodules: {', '.join(n for n in own if n)[:300]})"
            )
        names.append(f"{prefix}.{index}.{found}")
    return names


def use_eager_attention(model: nn.Module) -> None:
    """Switch a Hugging Face model to the eager attention kernel (needed for attention maps)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")


def disable_attention_dropout(model: nn.Module) -> nn.Module:
    """Set attention-probability dropout to 0 (BERT's `attention.self.dropout`, `config.
    attention_probs_dropout_prob`, Llama's `attention_dropout`): a dropped-out attention row no
    longer sums to 1, which makes an attention-distribution KL meaningless while training."""
    config = getattr(model, "config", None)
    for key in ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"):
        if config is not None and hasattr(config, key):
            setattr(config, key, 0.0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and (
            name.endswith("attention.self.dropout") or name.endswith("attn_dropout")
        ):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def transformer_features(
    model: nn.Module,
    batch: Mapping[str, Any],
    *,
    hidden_states: bool = True,
    attentions: bool = False,
    module_outputs: bool = False,
    attention_modules: Sequence[str] = ATTENTION_OUT,
    ffn_modules: Sequence[str] = FFN_OUT,
) -> TransformerFeatures:
    """Run `model(**batch)` once and collect the requested per-layer features.

    batch: model inputs (input_ids, attention_mask, token_type_ids, ...); a "labels" entry is not
    passed on (the loss is the distiller's job).
    module_outputs: hook each block's attention and feed-forward output modules (names found by
    `block_module_names` from `attention_modules` / `ffn_modules`).
    Gradients flow as usual; call it under `torch.no_grad()` for a teacher.
    """
    if attentions:
        use_eager_attention(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hooks = None
    if module_outputs:
        attn_names = block_module_names(model, attention_modules)
        ffn_names = block_module_names(model, ffn_modules)
        hooks = FeatureHooks(model, attn_names + ffn_names)
    try:
        output = model(**inputs, output_hidden_states=hidden_states, output_attentions=attentions)
        features = TransformerFeatures(logits=output.logits)
        if hidden_states:
            features.hidden_states = list(output.hidden_states)
        if attentions:
            maps = list(output.attentions or ())
            if not maps:
                raise RuntimeError(
                    f"{type(model).__name__} returned no attention maps; "
                    "load it with attn_implementation='eager'"
                )
            features.attentions = maps
        if hooks is not None:
            features.attention_out = [hooks.get(name) for name in attn_names]
            features.ffn_out = [hooks.get(name) for name in ffn_names]
    finally:
        if hooks is not None:
            hooks.remove()
    return features


@torch.no_grad()
def teacher_features(model: nn.Module, batch: Mapping[str, Any], **options: Any) -> TransformerFeatures:
    """`transformer_features` without gradients (for the frozen teacher)."""
    return transformer_features(model, batch, **options)


__all__ = [
    "ATTENTION_OUT",
    "FFN_OUT",
    "TransformerFeatures",
    "block_module_names",
    "disable_attention_dropout",
    "teacher_features",
    "transformer_features",
    "use_eager_attention",
]
