"""Shared pieces of the black-box (text-only teacher) methods: stored text -> training samples, the
completion cross-entropy distiller (sequence-level KD on teacher text) and sequence log-probs.

Sequence-level KD from an API teacher is supervised fine-tuning on the teacher's responses: the
teacher gives text only, so the loss is the student's cross-entropy on the teacher's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from kdkit.engine.distiller import Distiller
from kdkit.losses.tokens import IGNORE_INDEX
from kdkit.methods.base import Method
from kdkit.settings import ParamsModel
from kdkit.teachers.base import Prompt, SamplingParams
from kdkit.teachers.store import ResponseStore


def completion_log_probs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the label tokens under `model`.

    batch: input_ids / attention_mask / labels [B, T] (labels -100 off the completion).
    Returns (token_logps [B, T-1] with 0 where not trained, mask [B, T-1] bool).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    log_z = torch.logsumexp(logits.float(), dim=-1)
    picked = logits.float().gather(-1, targets.masked_fill(~mask, 0)[..., None])[..., 0]
    return (picked - log_z) * mask, mask


class CompletionCEDistiller(Distiller):
    """Cross-entropy on completion tokens only: the mean over the batch's trained tokens (nats).

    With teacher-written completions this is sequence-level KD from a text-only teacher; with the
    dataset's completions it is plain fine-tuning (the cold start of Gen-SSD, SODA's warm-up).
    Returns {"ce": mean NLL, "_tokens": count} (token-weighted accumulation in the engine).
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student, teacher=None)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        token_logps, mask = completion_log_probs(self.student, batch)
        tokens = mask.sum()
        return {"ce": -token_logps.sum() / tokens.clamp_min(1), "_tokens": tokens.detach().float()}


def stored_samples(
    store: ResponseStore, teacher_id: str, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
) -> list[dict[str, Any]]:
    """`{"prompt", "completion"}` samples from stored responses (n per prompt, in prompt order).

    Raises KeyError naming the first prompt the store lacks (run `collect` first).
    """
    out = []
    for prompt, generations in zip(prompts, store.get(teacher_id, prompts, params, n)):
        if not isinstance(prompt, str):
            raise ValueError("black-box methods train on text prompts; render chat prompts to text first")
        out.extend({"prompt": prompt, "completion": g.text} for g in generations)
    return out


def fine_tune(
    student: nn.Module,
    tokenizer: Any,
    samples: Sequence[dict[str, Any]],
    cfg: Any,
    run_dir: str | Path,
    *,
    resume: bool = True,
    description: str = "fine-tune",
) -> Any:
    """Cross-entropy fine-tuning of `student` on `{"prompt", "completion"}` samples with the engine.

    cfg: a `TrainConfig`. Returns the engine's `TrainResult`; `student` holds the trained weights.
    """
    from kdkit.engine import train
    from kdkit.engine.checkpoint import latest_checkpoint
    from kdkit.samplers.collate import PromptCompletionCollator

    if not samples:
        raise ValueError("no samples to fine-tune on (did every path fail the selection or the checker?)")
    return train(
        CompletionCEDistiller(student),
        list(samples),
        cfg,
        Path(run_dir),
        collate_fn=PromptCompletionCollator(tokenizer),
        resume=resume and latest_checkpoint(Path(run_dir)) is not None,  # a fresh stage starts quietly
        description=description,
    )


# ---------------------------------------------------------------------- the method kind "text"


class TeacherSamplingParams(ParamsModel):
    """How the text teacher samples its responses (part of the response-store key)."""

    teacher_temperature: float = Field(1.0, ge=0.0)
    teacher_top_p: float = Field(1.0, gt=0.0, le=1.0)
    teacher_max_tokens: PositiveInt = 256

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.teacher_temperature, top_p=self.teacher_top_p, max_tokens=self.teacher_max_tokens
        )


class TextMethod(Method):
    """A method that needs only the teacher's text (an API, a server, a local generator).

    Its stages (collect into the durable store, fine-tune, ...) run through `run`; the teacher is
    a `kdkit.teachers.TextTeacher`, never a loaded model.
    """

    kind = "text"

    @classmethod
    def run(
        cls,
        params: Any,
        *,
        student: nn.Module,
        tokenizer: Any,
        teacher: Any,
        store: ResponseStore,
        prompts: Sequence[str],
        run_dir: str | Path,
        checker: Any = None,
        progress: bool = False,
    ) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


def train_config(steps: int, *, lr: float, batch_size: int, samples: int, seed: int, progress: bool) -> Any:
    """The `TrainConfig` of one fine-tuning stage (warm-up 10% up to 10 steps, checkpoints at half)."""
    from kdkit.engine.settings import TrainConfig

    return TrainConfig(
        steps=steps,
        batch_size=max(1, min(batch_size, samples)),
        lr=lr,
        warmup_steps=min(10, steps // 10),
        seed=seed,
        checkpoint_every=max(steps // 2, 1),
        log_every=max(steps // 10, 1),
        mixed_precision="no",
        progress=progress,
    )


__all__ = [
    "CompletionCEDistiller",
    "TeacherSamplingParams",
    "TextMethod",
    "completion_log_probs",
    "fine_tune",
    "stored_samples",
    "train_config",
]
