"""Prompt/completion samples -> the LM batch every sampler and objective reads.

Batch layout (B rows, T = longest prompt+completion, P = longest prompt):

- ``input_ids`` [B, T] long, prompt + completion, right-padded with the pad id
- ``attention_mask`` [B, T] long, 1 on real tokens
- ``labels`` [B, T] long, the completion tokens (EOS included), -100 on prompt and padding
- ``prompt_ids`` [B, P] long and ``prompt_attention_mask`` [B, P]: the prompt alone, *left*-padded
  so that batched generation continues every row from its last prompt token
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdkit.data.padding import left_pad, right_pad
from kdkit.losses.tokens import IGNORE_INDEX


def build_lm_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """The batch dict (see module docstring) from token-id lists; completions already end in EOS."""
    full = [list(p) + list(c) for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + list(c) for p, c in zip(prompts, completions)]
    input_ids = right_pad(full, pad_id)
    attention_mask = right_pad([[1] * len(r) for r in full], pad_id, value=0)
    prompt_ids, prompt_attention_mask = left_pad(prompts, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": right_pad(labels, pad_id, value=IGNORE_INDEX),
        "prompt_ids": prompt_ids,
        "prompt_attention_mask": prompt_attention_mask,
    }


class PromptCompletionCollator:
    """Collate `{"prompt": str, "completion": str}` samples (or `prompt_ids`/`completion_ids` lists).

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), the completion without
    them and with EOS appended, so the loss teaches the model to stop. `max_length` truncates the
    completion (never the prompt) so prompt + completion fits. Extra integer fields (e.g. "digits")
    are passed through as a [B] tensor.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None, add_eos: bool = True) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)"
            )
        self.tokenizer, self.max_length, self.add_eos = tokenizer, max_length, add_eos

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, completions = [], []
        for sample in samples:
            prompt = sample.get("prompt_ids") or self.tokenizer(sample["prompt"])["input_ids"]
            completion = sample.get("completion_ids")
            if completion is None:
                completion = self.tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
            completion = list(completion)
            if self.add_eos and self.tokenizer.eos_token_id is not None:
                completion.append(self.tokenizer.eos_token_id)
            if self.max_length is not None:
                completion = completion[: max(self.max_length - len(prompt), 0)]
            prompts.append(list(prompt))
            completions.append(completion)
        batch = build_lm_batch(prompts, completions, self.tokenizer.pad_token_id)
        for key, value in samples[0].items():
            if key not in ("prompt", "completion", "prompt_ids", "completion_ids") and isinstance(value, int):
                batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
        return batch
