"""A causal LM's output head as the fused loss sees it: weight, bias and post-head logit transform.

Some model families change their logits after the LM head: Cohere multiplies by `logit_scale`,
Granite divides by `logits_scaling`, Gemma 2/3 soft-cap with `final_logit_softcapping`
(c·tanh(z/c)). Hugging Face applies these in `forward`, so a loss on `model(...).logits` is right;
the fused loss starts from hidden states and the head weight and must apply them itself. This module
reads the transform off a model's config, and refuses clearly a transform it does not know (naming
the config attribute), rather than silently training against a different distribution.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from torch import nn

from kdkit.losses.fused import LinearHead, LogitTransform

# model_type -> (config attribute, how it acts on the head's output z), each checked against the
# family's modeling code in transformers 5.x.
_KNOWN_TRANSFORMS: dict[str, tuple[str, str]] = {
    **{t: ("logit_scale", "multiply") for t in ("cohere", "cohere2", "cohere2_moe")},
    **{
        t: ("logits_scaling", "divide")
        for t in (
            "granite",
            "granite_swa",
            "granitemoe",
            "granitemoe_swa",
            "granitemoehybrid",
            "granitemoeshared",
        )
    },
    "hyperclovax": ("logits_scaling", "multiply"),  # the same name as Granite's, the other way round
    "falcon_h1": ("lm_head_multiplier", "multiply"),
    **{
        t: ("final_logit_softcapping", "softcap")
        for t in ("gemma2", "gemma3", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat")
    },
}
# Config attributes that look like a post-head logit transform (scale, multiplier or cap of the
# logits / LM head / output); attention and router logits are not the model's output.
_TRANSFORM_LIKE = re.compile(r"(logit|lm_head|output).*(scal|cap|mult)")
_NOT_OUTPUT = ("attn", "attention", "router", "moe_router", "conf_attention")


class UnsupportedHeadError(ValueError):
    """The model transforms its logits after the head in a way kdkit's fused loss does not know."""


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text(decoder=True)
        except (TypeError, ValueError):
            return config
    return config


def _is_identity(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (int, float)) and value in (0, 1))


def head_transform(model_or_config: Any) -> LogitTransform:
    """The post-head `LogitTransform` of a Hugging Face causal LM (or its config).

    Cohere: scale = logit_scale; Granite: scale = 1 / logits_scaling; Gemma 2/3: softcap =
    final_logit_softcapping; identity for models without one (Llama, Qwen, Mistral, GPT-2, ...).
    Raises `UnsupportedHeadError` naming the attribute when the config sets a transform-like value
    (e.g. `output_multiplier`, `logits_soft_cap`) whose meaning for this model kdkit does not know.
    """
    config = _text_config(model_or_config)
    model_type = getattr(config, "model_type", "?")
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    known = _KNOWN_TRANSFORMS.get(model_type)
    scale, softcap = 1.0, None
    if known is not None:
        attribute, how = known
        value = settings.get(attribute, getattr(config, attribute, None))
        if value is not None:
            if how == "multiply":
                scale = float(value)
            elif how == "divide":
                scale = 1.0 / float(value)
            else:
                softcap = float(value) if value else None
    for key, value in settings.items():
        if known is not None and key == known[0]:
            continue
        if _TRANSFORM_LIKE.search(key) and not key.startswith(_NOT_OUTPUT) and not _is_identity(value):
            raise UnsupportedHeadError(
                f"kdkit: {model_type} config sets {key}={value!r}, which looks like a post-head logit "
                "transform kdkit does not know; the fused loss would train against logits the model "
                "does not produce. Use the unfused loss (fused: false), which reads the model's own "
                "logits, or add the transform to kdkit.models.heads"
            )
    return LogitTransform(scale=scale, softcap=softcap)


def output_head(model: nn.Module) -> LinearHead:
    """The model's LM head as a `LinearHead` (weight [V, H], bias [V] or None, logit transform)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the fused loss needs a causal LM whose output head is an nn.Linear, got "
            f"{type(head).__name__ if head is not None else 'none'} in {type(model).__name__}"
        )
    return LinearHead(head.weight, head.bias, head_transform(model))


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, LinearHead]:
    """(decoder returning final-normed hidden states, `LinearHead`) of a Hugging Face causal LM.

    `backbone(**inputs).last_hidden_state` [B, T, H] is what `head.logits` maps to the model's own
    logits [B, T, V]; both go to `kdkit.losses.fused.fused_causal_lm_losses`.
    """
    backbone: Any = model
    for _ in range(4):  # descend through wrappers (PEFT's PeftModel -> LoraModel -> causal LM) to the decoder
        inner = getattr(backbone, getattr(backbone, "base_model_prefix", "model"), None)
        if not isinstance(inner, nn.Module) or inner is backbone:
            raise ValueError(
                f"the fused loss needs a Hugging Face causal LM with a backbone, got {type(model).__name__}"
            )
        backbone = inner
        get_head = getattr(backbone, "get_output_embeddings", None)
        if not callable(get_head) or get_head() is None:  # a decoder, not another model with a head
            return backbone, output_head(model)
    raise ValueError(f"no decoder without an LM head found inside {type(model).__name__}")


def fused_loss_support(model: Any, role: str = "model") -> str | None:
    """None when the fused loss can project `model` (a Hugging Face causal LM with a backbone and
    a head whose post-head transform kdkit knows), else why not (for `fused: auto`)."""
    if not isinstance(model, nn.Module):
        return f"the {role} is not a torch module"
    try:
        backbone_and_head(model)
    except (ValueError, AttributeError, TypeError) as error:  # UnsupportedHeadError is a ValueError
        return f"the {role}: {error}"
    return None


def logits_from(model: nn.Module, inputs: dict[str, Any], start: int) -> Any:
    """The model's logits [B, T - start, V] of positions start..T-1 only (the model's own output,
    post-head transforms included), through Hugging Face's `logits_to_keep` where the model takes
    it (the head then projects only those positions), else sliced from the full logits."""
    if start > 0 and accepts_argument(model, "logits_to_keep"):
        length = inputs["input_ids"].shape[1]
        return model(**inputs, logits_to_keep=length - start).logits
    return model(**inputs).logits[:, start:]


def accepts_argument(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes the keyword `name` (False when its signature is unreadable)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = [
    "UnsupportedHeadError",
    "accepts_argument",
    "backbone_and_head",
    "fused_loss_support",
    "head_transform",
    "logits_from",
    "output_head",
]
