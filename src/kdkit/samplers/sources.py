"""Where LM training sequences come from, as batch transforms `sampler(batch, *, student, teacher)`.

- `DatasetSampler`: the dataset's completions as they are (off-policy, supervised KD).
- `TeacherSampler`: the teacher's own completions of the prompts (sequence-level KD).
- `StudentSampler`: the student's own samples (on-policy; removes exposure bias).
- `MixtureSampler`: per batch, with probability λ the student's samples, else the dataset's (GKD).

Each returns a batch with input_ids / attention_mask / labels (completion tokens only), the prompt
tensors, `source` (a str: "dataset" / "teacher" / "student") and `sampler_info` (a dict of floats
for logging: generation seconds, generated tokens, truncated rows). Samplers that generate run on
the models they are given, which the distiller passes unwrapped (inside its own forward), so the
engine loop is the same for every method.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from kdkit.samplers.generation import GenerationSettings, generate_batch

Batch = dict[str, Any]


def _prompt_tensors(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if "prompt_ids" not in batch:
        raise KeyError(
            "a generating sampler needs 'prompt_ids' and 'prompt_attention_mask' in the batch "
            "(use kdkit.samplers.collate.PromptCompletionCollator)"
        )
    return batch["prompt_ids"], batch["prompt_attention_mask"]


class DatasetSampler:
    """Off-policy: train on the dataset's own completions (the batch passes through unchanged)."""

    source = "dataset"

    def __call__(self, batch: Batch, *, student: nn.Module, teacher: nn.Module | None) -> Batch:
        out = dict(batch)
        out["source"] = self.source
        out["sampler_info"] = {"generation_s": 0.0, "new_tokens": float((batch["labels"] != -100).sum())}
        return out


class _GeneratingSampler:
    source = "?"

    def __init__(self, settings: GenerationSettings | None = None, **kwargs: Any) -> None:
        self.settings = settings or GenerationSettings(**kwargs)

    def model(self, student: nn.Module, teacher: nn.Module | None) -> nn.Module:
        raise NotImplementedError

    def __call__(self, batch: Batch, *, student: nn.Module, teacher: nn.Module | None) -> Batch:
        prompt_ids, prompt_mask = _prompt_tensors(batch)
        generated, info = generate_batch(self.model(student, teacher), prompt_ids, prompt_mask, self.settings)
        # Keep the dataset's extra fields (e.g. "digits"), but never its completion tokens.
        out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
        out |= generated
        out["source"] = self.source
        out["sampler_info"] = {k: float(v) for k, v in info.items()}
        return out


class TeacherSampler(_GeneratingSampler):
    """Sequence-level KD: the teacher completes each prompt (sampling settings in `settings`)."""

    source = "teacher"

    def model(self, student: nn.Module, teacher: nn.Module | None) -> nn.Module:
        if teacher is None:
            raise ValueError("TeacherSampler needs a teacher model")
        return teacher


class StudentSampler(_GeneratingSampler):
    """On-policy: the current student samples each completion (KV cache, no grad, eval mode)."""

    source = "student"

    def model(self, student: nn.Module, teacher: nn.Module | None) -> nn.Module:
        return student


class MixtureSampler:
    """GKD's mixture: per batch, with probability `lmbda` use `on_policy`, else `off_policy`.

    seed=None (the default) draws from Python's global `random`, which the engine seeds from
    `TrainConfig.seed` and saves/restores in its checkpoints, so a run and its resumed twin draw the
    same sources. An explicit `seed` uses a private `random.Random(seed)` instead (independent of
    other random draws; save it with `state_dict`). λ=0 is pure dataset, λ=1 pure student samples.
    """

    def __init__(
        self,
        lmbda: float = 0.5,
        on_policy: Any | None = None,
        off_policy: Any | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        self.lmbda = lmbda
        self.on_policy = on_policy or StudentSampler()
        self.off_policy = off_policy or DatasetSampler()
        self.rng: Any = random.Random(seed) if seed is not None else random

    def __call__(self, batch: Batch, *, student: nn.Module, teacher: nn.Module | None) -> Batch:
        # Draw even when λ is 0 or 1 so the RNG stream does not depend on λ's edge values.
        choose_on_policy = self.rng.random() < self.lmbda
        chosen = self.on_policy if choose_on_policy else self.off_policy
        return chosen(batch, student=student, teacher=teacher)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
