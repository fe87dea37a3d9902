"""Sequence-level KD from a text-only teacher: fine-tune the student on the teacher's stored responses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat, PositiveInt

from kdkit.methods.blackbox import TeacherSamplingParams, TextMethod, fine_tune, stored_samples, train_config
from kdkit.registry import METHODS
from kdkit.teachers.store import collect


class TextSeqKDParams(TeacherSamplingParams):
    """samples_per_prompt: teacher responses per prompt; steps / lr / batch_size: the fine-tune."""

    samples_per_prompt: PositiveInt = 1
    steps: PositiveInt = 200
    lr: PositiveFloat = 1e-3
    batch_size: PositiveInt = 32
    seed: int = Field(0)


@METHODS.register(
    "text_seqkd", "sequence-level KD from a text-only teacher: fine-tune on its stored responses"
)
class TextSeqKD(TextMethod):
    Params = TextSeqKDParams

    @classmethod
    def run(
        cls,
        params: Any,
        *,
        student,
        tokenizer,
        teacher,
        store,
        prompts,
        run_dir,
        checker=None,
        progress=False,
    ):  # type: ignore[no-untyped-def]
        sampling = params.sampling()
        report = collect(teacher, store, prompts, sampling, n=params.samples_per_prompt, progress=progress)
        samples = stored_samples(store, teacher.teacher_id, prompts, sampling, params.samples_per_prompt)
        cfg = train_config(
            params.steps,
            lr=params.lr,
            batch_size=params.batch_size,
            samples=len(samples),
            seed=params.seed,
            progress=progress,
        )
        result = fine_tune(student, tokenizer, samples, cfg, Path(run_dir) / "seqkd", description="seqkd")
        return {"collection": report.to_json(), "samples": len(samples), "final": result.final_losses}
