"""Hugging Face causal LMs: load, build from a config, save a plain folder.

Students derived by layer selection come from `kdkit.models.builders` (re-exported here).

Everything here returns ordinary `transformers` objects, and `save_pretrained_folder` writes a
folder that `AutoModelForCausalLM.from_pretrained` reads without kdkit installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kdkit.models.builders import derive_student, layer_stack, select_layers, student_config

# derive_student / select_layers / student_config live in kdkit.models.builders (encoders and
# decoders alike); they are re-exported here for the LM pipeline and existing callers.
__all__ = [
    "build_causal_lm",
    "decoder_layers",
    "derive_student",
    "ensure_pad_token",
    "load_causal_lm",
    "resolve_dtype",
    "save_pretrained_folder",
    "select_layers",
    "student_config",
]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """ "float32" / "bfloat16" / "float16" (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return resolved


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token its eos token as pad, without adding ids.

    Reusing eos keeps the vocabulary (and so the embedding matrix) unchanged; padded positions are
    excluded by the attention mask and by labels = -100, so the choice of id does not matter.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path or type(tokenizer).__name__} has neither a pad "
                "nor an eos token; set tokenizer.pad_token before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder or a hub id (plain `from_pretrained`).

    gguf_file: a GGUF file name inside `name_or_path`; transformers dequantises it to `dtype`.
    The tokenizer gets a pad token (its eos) if it has none. The model is returned in eval mode.
    """
    model = AutoModelForCausalLM.from_pretrained(
        str(name_or_path), dtype=resolve_dtype(dtype), gguf_file=gguf_file
    )
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), gguf_file=gguf_file)
    ensure_pad_token(tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
    return model.to(device).eval(), tokenizer


def build_causal_lm(config: dict[str, Any] | PretrainedConfig, *, seed: int | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM from a config object or a dict with a `model_type` key.

    e.g. build_causal_lm({"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, ...})
    """
    if isinstance(config, dict):
        options = dict(config)
        model_type = options.pop("model_type", None)
        if model_type is None:
            raise ValueError("a config dict needs a 'model_type' (e.g. 'llama')")
        config = AutoConfig.for_model(model_type, **options)
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (qualified name, ModuleList) of a decoder LM's transformer blocks (see builders.layer_stack):
    `model.layers` (Llama, Qwen, Mistral, Gemma), `transformer.h` (GPT-2), ..."""
    return layer_stack(model)


def save_pretrained_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | Path
) -> Path:
    """Write a plain Hugging Face model folder: model.safetensors + config.json (+ tokenizer files).

    The folder loads with `AutoModelForCausalLM.from_pretrained(path)` without kdkit.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
