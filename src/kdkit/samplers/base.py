"""What every LM sampler shares: the build context, the sampling parameters, the generating base.

A sampler is a batch transform `sampler(batch, *, student, teacher) -> batch` (see
`kdkit.samplers` for the batch layout). Registered samplers are classes built as
`Sampler(params, ctx)`: `params` is the class's pydantic `Params`, `ctx` an `LMContext`.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from kdkit.samplers.generation import GenerationSettings, generate_batch, repeat_rows
from kdkit.settings import LMContext, NoParams, ParamsModel

Batch = dict[str, Any]


class GenerationParams(ParamsModel):
    """How a generating sampler draws completions. `sampling_temperature` decides *which
    sequences* are trained on; it is deliberately separate from the loss's distillation
    temperature (reusing one for the other is a classic bug). 0 = greedy decoding."""

    sampling_temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: PositiveInt = 64
    #: completions per prompt (G of group methods); they share one prompt prefill and come back as
    #: consecutive rows, the batch's other per-row fields repeated to match.
    num_samples: PositiveInt = 1
    #: decode Llama / Mistral / Qwen2 / Qwen3 students with kdkit's lean decoder (the same logits
    #: from the live weights, a fraction of the per-token overhead of the model's forward); other
    #: models always use their own forward. false = always the model's forward.
    fast_decode: bool = True
    #: the lean decoder's steps as CUDA graph replays: null = on CUDA devices, true = the
    #: fixed-shape step everywhere (eager off CUDA), false = never (GenerationSettings.graph_decode).
    graph_decode: bool | None = None
    #: the fixed-shape step and the token draw through torch.compile where no CUDA graph runs them
    #: (CPUs): 1.3-2x the tokens/s for small students, after a one-time compile per shape (seconds
    #: to a minute); for long runs (GenerationSettings.compile_decode). Needs graph_decode null/true.
    compile_decode: bool = False

    @model_validator(mode="after")
    def _compile_needs_fixed_shape(self) -> GenerationParams:
        if self.compile_decode and self.graph_decode is False:
            raise ValueError(
                "compile_decode: true compiles the fixed-shape decode step; graph_decode: false turns "
                "that step off (set graph_decode to null or true, or compile_decode to false)"
            )
        return self


def generation_settings(params: GenerationParams, ctx: LMContext) -> GenerationSettings:
    return GenerationSettings(
        temperature=params.sampling_temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        eos_token_id=ctx.eos_token_ids or None,
        pad_token_id=ctx.pad_token_id,
        num_samples=params.num_samples,
        fast_decode=params.fast_decode,
        graph_decode=params.graph_decode,
        compile_decode=params.compile_decode,
    )


def prompt_tensors(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if "prompt_ids" not in batch:
        raise KeyError(
            "a generating sampler needs 'prompt_ids' and 'prompt_attention_mask' in the batch "
            "(use kdkit.samplers.collate.PromptCompletionCollator)"
        )
    return batch["prompt_ids"], batch["prompt_attention_mask"]


class GeneratingSampler:
    """Base of samplers that complete each prompt with a model (`model` picks which)."""

    Params = GenerationParams
    source = "?"
    generates = True

    def __init__(
        self, params: GenerationParams | None = None, ctx: LMContext | None = None, **settings: Any
    ) -> None:
        self.params = params or GenerationParams()
        self.settings = generation_settings(self.params, ctx or LMContext())
        if settings:  # direct use from Python: GenerationSettings fields override
            from dataclasses import replace

            self.settings = replace(self.settings, **settings)

    def model(self, student: nn.Module, teacher: nn.Module | None) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, batch: Batch, *, student: nn.Module, teacher: nn.Module | None) -> Batch:
        prompt_ids, prompt_mask = prompt_tensors(batch)
        generated, info = generate_batch(self.model(student, teacher), prompt_ids, prompt_mask, self.settings)
        # Keep the dataset's extra fields (e.g. "digits"), but never its completion tokens.
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
        out = repeat_rows(out, self.settings.num_samples)
        out |= generated
        out["source"] = self.source
        out["sampler_info"] = {k: float(v) for k, v in info.items()}
        out["sampling_temperature"] = self.settings.temperature
        return out


__all__ = [
    "Batch",
    "GeneratingSampler",
    "GenerationParams",
    "LMContext",
    "NoParams",
    "generation_settings",
    "prompt_tensors",
]
