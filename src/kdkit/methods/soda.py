"""SODA — semi on-policy distillation from a text-only teacher, with a DPO loss.

1. Collect the teacher's responses to the training prompts (durable store, paid for once).
2. Sample the *base* student's responses to the same prompts once: a frozen snapshot, stored in
   the same store under the teacher id "student:<name>" (so a crash never resamples it either).
3. Optional SFT warm-up on the teacher's responses (default on).
4. DPO with the teacher's response as *chosen* and the snapshot response as *rejected*, the
   warmed-up student (frozen copy) as the reference; β and an optional NLL term on the chosen
   text are options. No per-step rollouts and no discriminator: the student's own distribution
   enters only through the one snapshot, hence "semi on-policy".

Batches hold each pair as two rows: rows [0, B) are the chosen texts, rows [B, 2B) the rejected
ones of the same prompts (`PairCollator`), so one forward pass scores both.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from kdkit.engine.checkpoint import latest_checkpoint
from kdkit.engine.distiller import Distiller
from kdkit.losses.preference import dpo_loss
from kdkit.losses.tokens import IGNORE_INDEX
from kdkit.methods.blackbox import (
    TeacherSamplingParams,
    TextMethod,
    completion_log_probs,
    fine_tune,
    stored_samples,
)
from kdkit.registry import METHODS
from kdkit.samplers.collate import build_lm_batch
from kdkit.samplers.generation import GenerationSettings, generate_batch
from kdkit.teachers.base import Prompt, SamplingParams, TextTeacher
from kdkit.teachers.local import HFTeacher
from kdkit.teachers.store import ResponseStore, collect


class PairCollator:
    """`{"prompt", "chosen", "rejected"}` samples -> one LM batch of 2B rows (chosen, then rejected).

    Each completion is tokenized without special tokens and ends in EOS. Adds "pairs": B.
    """

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its EOS token)"
            )
        self.tokenizer, self.max_length = tokenizer, max_length

    def _completion(self, text: str, prompt_len: int) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return ids[: max(self.max_length - prompt_len, 1)] if self.max_length else ids

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [self.tokenizer(s["prompt"])["input_ids"] for s in samples]
        chosen = [self._completion(s["chosen"], len(p)) for s, p in zip(samples, prompts)]
        rejected = [self._completion(s["rejected"], len(p)) for s, p in zip(samples, prompts)]
        batch = build_lm_batch(prompts + prompts, chosen + rejected, self.tokenizer.pad_token_id)
        batch["pairs"] = torch.tensor(len(samples))
        return batch


class DPODistiller(Distiller):
    """DPO on (chosen, rejected) pairs against a frozen reference model (held in the teacher slot).

    beta: the DPO temperature β. nll_weight: weight of the mean NLL of the chosen tokens (0 = off).
    label_smoothing: conservative DPO's ε. resample: None (SODA: the batch's rejected rows are the
    frozen snapshot) or generation settings to replace them every step by fresh samples of the
    current student (the fully on-policy baseline SODA is measured against; slower).
    Returns {"dpo", "nll"?} plus diagnostics: reward accuracy (share of pairs with a positive
    margin), mean margin, chosen/rejected rewards and the step's generation seconds.
    """

    def __init__(
        self,
        student: nn.Module,
        reference: nn.Module,
        *,
        beta: float = 0.1,
        nll_weight: float = 0.0,
        label_smoothing: float = 0.0,
        resample: GenerationSettings | None = None,
    ) -> None:
        super().__init__(student, reference)
        self.resample = resample
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight}")
        self.beta, self.nll_weight, self.label_smoothing = beta, nll_weight, label_smoothing

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pairs = int(batch["pairs"])
        generation_s = 0.0
        if self.resample is not None:
            batch, generation_s = self._resampled(batch, pairs)
        token_logps, mask = completion_log_probs(self.student, batch)
        with torch.no_grad():
            ref_logps, _ = completion_log_probs(self.teacher, batch)
        policy, reference = token_logps.sum(-1), ref_logps.sum(-1)  # [2B] summed nats
        out = dpo_loss(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )
        terms = {"dpo": out.loss}
        if self.nll_weight > 0:
            chosen_tokens = mask[:pairs].sum().clamp_min(1)
            terms["nll"] = self.nll_weight * (-token_logps[:pairs].sum() / chosen_tokens)
        return terms | {
            "_reward_accuracy": (out.margins > 0).float().mean(),
            "_margin": out.margins.mean(),
            "_chosen_reward": out.chosen_rewards.mean(),
            "_rejected_reward": out.rejected_rewards.mean(),
            "_gen_s": torch.tensor(generation_s),
        }

    def _resampled(self, batch: dict[str, Tensor], pairs: int) -> tuple[dict[str, Tensor], float]:
        """The batch with its rejected rows replaced by the current student's samples."""
        prompt_ids, prompt_mask = batch["prompt_ids"][:pairs], batch["prompt_attention_mask"][:pairs]
        fresh, info = generate_batch(self.student, prompt_ids, prompt_mask, self.resample)
        labels = batch["labels"][:pairs]
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        chosen = [row[row != IGNORE_INDEX].tolist() for row in labels]
        rejected = [row[row != IGNORE_INDEX].tolist() for row in fresh["labels"]]
        pad = self.resample.pad_token_id if self.resample.pad_token_id is not None else 0
        rebuilt = build_lm_batch(prompts + prompts, chosen + rejected, pad)
        rebuilt = {k: v.to(labels.device) for k, v in rebuilt.items()}
        return rebuilt | {"pairs": batch["pairs"]}, float(info["generation_s"])


@dataclass
class SODASettings:
    """Options of SODA (see the module docstring).

    warmup: SFT on the teacher's responses before DPO (default on); warmup_steps its length.
    beta, nll_weight, label_smoothing: the DPO loss. dpo_steps: DPO optimizer steps.
    student_params: how the base student's snapshot is sampled.
    """

    warmup: bool = True
    warmup_steps: int = 200
    warmup_lr: float = 3e-3
    dpo_steps: int = 100
    dpo_lr: float = 5e-4
    beta: float = 0.1
    nll_weight: float = 0.0
    label_smoothing: float = 0.0
    batch_size: int = 32
    seed: int = 0
    student_params: SamplingParams = SamplingParams(temperature=1.0, max_tokens=64)
    on_policy: bool = False  # the baseline: fresh student samples as rejected at every DPO step


def snapshot_id(student_name: str) -> str:
    """The store's teacher id of the base student's frozen snapshot."""
    return f"student:{student_name}"


def run_soda(
    student: nn.Module,
    tokenizer: Any,
    teacher: TextTeacher,
    store: ResponseStore,
    prompts: Sequence[Prompt],
    teacher_params: SamplingParams,
    run_dir: str | Path,
    *,
    student_name: str = "student",
    settings: SODASettings | None = None,
    progress: bool = False,
    on_warmed_up: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Run SODA end to end; `student` is trained in place. Returns a JSON-safe summary.

    on_warmed_up(student) is called after the warm-up, before DPO (e.g. to evaluate or copy the
    warmed-up student, which is sequence-level KD on the same teacher responses).

    Resumable: the teacher's and the snapshot's responses come from the store (only missing
    ones are requested), and each training stage resumes from its checkpoints in `run_dir`.
    """
    from kdkit.engine.settings import TrainConfig

    s = settings or SODASettings()
    run_dir = Path(run_dir)
    teacher_report = collect(
        teacher, store, prompts, teacher_params, progress=progress, description="teacher"
    )
    # The snapshot is taken from the *base* student, before any warm-up.
    base = HFTeacher(student, tokenizer, teacher_id=snapshot_id(student_name), batch_size=s.batch_size)
    snapshot_report = collect(
        base, store, prompts, s.student_params, progress=progress, description="snapshot"
    )
    chosen = stored_samples(store, teacher.teacher_id, prompts, teacher_params)
    rejected = stored_samples(store, base.teacher_id, prompts, s.student_params)
    pairs = [
        {"prompt": c["prompt"], "chosen": c["completion"], "rejected": r["completion"]}
        for c, r in zip(chosen, rejected)
    ]
    identical = sum(p["chosen"] == p["rejected"] for p in pairs)
    pairs = [p for p in pairs if p["chosen"] != p["rejected"]]  # no preference between equal texts
    if not pairs:
        raise ValueError(
            f"all {identical} teacher responses equal the student's snapshot: DPO has no preference to learn"
        )

    def config(steps: int, lr: float) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=min(s.batch_size, max(len(pairs), 1)),
            lr=lr,
            warmup_steps=min(10, steps // 10),
            seed=s.seed,
            checkpoint_every=max(steps // 2, 1),
            log_every=max(steps // 10, 1),
            mixed_precision="no",
            progress=progress,
        )

    warmup_result = None
    if s.warmup and s.warmup_steps > 0:
        warmup_result = fine_tune(
            student,
            tokenizer,
            chosen,
            config(s.warmup_steps, s.warmup_lr),
            run_dir / "warmup",
            description="warm-up",
        )
    if on_warmed_up is not None:
        on_warmed_up(student)
    reference = copy.deepcopy(student).eval()
    from kdkit.engine import train

    resample = None
    if s.on_policy:
        params = s.student_params
        resample = GenerationSettings(
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=params.max_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    distiller = DPODistiller(
        student,
        reference,
        beta=s.beta,
        nll_weight=s.nll_weight,
        label_smoothing=s.label_smoothing,
        resample=resample,
    )
    started = time.perf_counter()
    dpo_result = train(
        distiller,
        pairs,
        config(s.dpo_steps, s.dpo_lr),
        run_dir / "dpo",
        collate_fn=PairCollator(tokenizer),
        resume=latest_checkpoint(run_dir / "dpo") is not None,
        description="dpo",
    )
    return {
        "teacher_collection": teacher_report.to_json(),
        "snapshot_collection": snapshot_report.to_json(),
        "pairs": len(pairs),
        "identical_pairs_dropped": identical,
        "warmup_final": warmup_result.final_losses if warmup_result else None,
        "dpo_final": dpo_result.final_losses,
        "dpo_seconds": time.perf_counter() - started,
        "settings": asdict(s) | {"student_params": s.student_params.to_json()},
    }


# ---------------------------------------------------------------------- the registered method


class SODAParams(TeacherSamplingParams):
    """SODA's options (see `SODASettings`); student_* set how the base student's snapshot is sampled;
    student_name names the snapshot in the store (give each distinct base student its own)."""

    warmup: bool = True
    warmup_steps: PositiveInt = 200
    warmup_lr: PositiveFloat = 3e-3
    dpo_steps: PositiveInt = 100
    dpo_lr: PositiveFloat = 5e-4
    beta: PositiveFloat = 0.1
    nll_weight: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    batch_size: PositiveInt = 32
    seed: int = 0
    student_temperature: float = Field(1.0, ge=0.0)
    student_max_tokens: PositiveInt = 256
    student_name: str = "student"
    on_policy: bool = False


@METHODS.register(
    "soda",
    "SODA: teacher text chosen vs a frozen snapshot of the base student rejected, DPO after SFT warm-up",
)
class SODA(TextMethod):
    Params = SODAParams

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
        p = params
        settings = SODASettings(
            warmup=p.warmup,
            warmup_steps=p.warmup_steps,
            warmup_lr=p.warmup_lr,
            dpo_steps=p.dpo_steps,
            dpo_lr=p.dpo_lr,
            beta=p.beta,
            nll_weight=p.nll_weight,
            label_smoothing=p.label_smoothing,
            batch_size=p.batch_size,
            seed=p.seed,
            student_params=SamplingParams(temperature=p.student_temperature, max_tokens=p.student_max_tokens),
            on_policy=p.on_policy,
        )
        return run_soda(
            student,
            tokenizer,
            teacher,
            store,
            prompts,
            p.sampling(),
            run_dir,
            student_name=p.student_name,
            settings=settings,
            progress=progress,
        )


__all__ = ["SODA", "DPODistiller", "PairCollator", "SODAParams", "SODASettings", "run_soda", "snapshot_id"]
