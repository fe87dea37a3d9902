"""Batched sampling of completions with the KV cache, returned as a training batch.

The sampling temperature / top-p here decide *which sequences* are trained on; they are separate
from the distillation temperature of the loss (a common bug elsewhere is to reuse one for both).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.samplers.collate import build_lm_batch


@dataclass(frozen=True)
class GenerationSettings:
    """How sequences are sampled. `temperature` is the *sampling* temperature (not the loss's).

    temperature=0 means greedy decoding. `eos_token_id`/`pad_token_id` default to the model's
    generation config (then its config).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    eos_token_id: int | None = None
    pad_token_id: int | None = None


def _special_id(model: nn.Module, name: str, given: int | None) -> int | None:
    if given is not None:
        return given
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, name, None) if source is not None else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def completion_lengths(new_tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Per-row number of generated tokens up to and including the first EOS: [B] long.

    new_tokens: [B, N] generated ids. Rows without EOS keep all N tokens (truncated samples).
    """
    batch, width = new_tokens.shape
    if eos_token_id is None or width == 0:
        return torch.full((batch,), width, dtype=torch.long)
    is_eos = new_tokens == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full((batch,), width))
    return first.long()


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    settings: GenerationSettings,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Sample one completion per (left-padded) prompt and build a right-padded training batch.

    prompt_ids, prompt_attention_mask: [B, P]. Returns (batch, info): batch has input_ids /
    attention_mask / labels [B, T] (labels = generated tokens up to and including the first EOS,
    -100 on the prompt and after EOS) plus the prompt tensors unchanged; info has "generation_s"
    (wall seconds), "new_tokens" (trained completion tokens) and "truncated" (rows without EOS).
    The model is switched to eval mode for sampling (no dropout) and restored afterwards.
    """
    eos = _special_id(model, "eos_token_id", settings.eos_token_id)
    pad = _special_id(model, "pad_token_id", settings.pad_token_id)
    pad = eos if pad is None else pad
    if pad is None:
        raise ValueError("generation needs a pad or EOS token id (set GenerationSettings.pad_token_id)")
    sampling = settings.temperature > 0
    options: dict[str, Any] = {"do_sample": sampling}
    if sampling:
        options |= {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_attention_mask,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            **options,
        )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    new_tokens = out[:, prompt_ids.shape[1] :]
    lengths = completion_lengths(new_tokens, eos)
    prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_attention_mask)]
    completions = [row[: int(n)].tolist() for row, n in zip(new_tokens, lengths)]
    batch = build_lm_batch(prompts, completions, pad)
    batch = {k: v.to(prompt_ids.device) for k, v in batch.items()}
    batch["prompt_ids"], batch["prompt_attention_mask"] = prompt_ids, prompt_attention_mask
    has_eos = (new_tokens == eos).any(1) if eos is not None else torch.zeros(len(lengths), dtype=torch.bool)
    info = {"generation_s": seconds, "new_tokens": int(lengths.sum()), "truncated": int((~has_eos).sum())}
    return batch, info
