"""Gen-SSD — student-in-the-loop chain-of-thought selection (generation-time self-selection).

After a short cold-start fine-tune of the student (on a few full teacher responses), the teacher
writes each reasoning path in chunks of `chunk_tokens` tokens. At every chunk it proposes `k`
candidate continuations of prompt + path so far; the student scores each by its perplexity
(exp of the mean NLL of the candidate's tokens given prompt + prefix, EOS included when the
candidate ends the path); the lowest-perplexity candidate is appended. If no candidate is under
`threshold`, the path is pruned (stopped early and dropped). Paths that reach EOS are finished;
an optional answer checker filters them. The student is then fine-tuned on the selected paths.

Every teacher proposal goes through the durable store (prompt = prompt + prefix, n = k), so a
crashed selection resumes without paying for a proposal twice. The summary reports the selected
paths' lengths and the student perplexities of selected against unselected candidates.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from kdkit.methods.blackbox import TeacherSamplingParams, TextMethod, fine_tune, stored_samples
from kdkit.registry import METHODS
from kdkit.teachers.base import SamplingParams, TextTeacher
from kdkit.teachers.local import HFTeacher
from kdkit.teachers.store import ResponseStore, collect


@dataclass
class GenSSDSettings:
    """Options of Gen-SSD.

    k: candidate continuations per chunk. chunk_tokens: teacher tokens per chunk. threshold:
    the largest student perplexity a kept candidate may have (else the path is pruned).
    max_chunks: chunks per path at most (a path still running then is dropped as unfinished).
    temperature / top_p: the teacher's sampling of candidates. cold_start_prompts: prompts whose
    full teacher responses fine-tune the student first (cold_start_steps steps; 0 = none).
    finetune_on_cold_start: the final fine-tune also sees the cold-start responses (already paid).
    max_requests: a teacher-request budget for the whole run (cold start included): selection
    takes the prompts in groups of `batch_size` and stops starting groups once it is spent
    (None = select on every prompt).
    """

    k: int = 4
    chunk_tokens: int = 32
    threshold: float = 2.0
    max_chunks: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    cold_start_prompts: int = 64
    cold_start_steps: int = 100
    finetune_steps: int = 200
    lr: float = 3e-3
    batch_size: int = 32
    finetune_on_cold_start: bool = True
    max_requests: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.chunk_tokens < 1 or self.max_chunks < 1:
            raise ValueError("k, chunk_tokens and max_chunks must be >= 1")
        if not self.threshold > 1.0:
            raise ValueError(f"threshold is a perplexity and must be > 1, got {self.threshold}")

    def chunk_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.chunk_tokens)


@dataclass
class ReasoningPath:
    """One reasoning path under construction (see `select_paths`)."""

    prompt: str
    text: str = ""
    status: str = "running"  # running | finished | pruned | unfinished | wrong
    chunks: int = 0
    selected_ppl: list[float] = field(default_factory=list)
    unselected_ppl: list[float] = field(default_factory=list)


def candidate_perplexities(
    scorer: HFTeacher, context: str, candidates: Sequence[str], ends: Sequence[bool]
) -> list[float]:
    """The student's perplexity of each candidate given `context` (EOS appended where it ends)."""
    eos = scorer.tokenizer.eos_token or ""
    texts = [c + eos if end else c for c, end in zip(candidates, ends)]
    scored = scorer.score([context] * len(texts), texts)
    return [math.exp(-statistics.fmean(s.token_logprobs)) if s.token_logprobs else math.inf for s in scored]


def select_paths(
    teacher: TextTeacher,
    student: nn.Module,
    tokenizer: Any,
    store: ResponseStore,
    prompts: Sequence[str],
    settings: GenSSDSettings,
    *,
    checker: Callable[[str, str], bool] | None = None,
    progress: bool = False,
    counter: dict[str, int] | None = None,
) -> list[ReasoningPath]:
    """Grow one path per prompt chunk by chunk (all active paths' proposals requested together).

    checker(prompt, path_text) -> bool filters finished paths (status "wrong" when it says no).
    counter: if given, counter["requests"] is increased by the teacher requests sent.
    """
    params = settings.chunk_params()
    scorer = HFTeacher(
        student, tokenizer, teacher_id="gen-ssd-scorer", batch_size=max(settings.batch_size, 1)
    )
    paths = [ReasoningPath(p) for p in prompts]
    for chunk in range(settings.max_chunks):
        active = [path for path in paths if path.status == "running"]
        if not active:
            break
        contexts = [path.prompt + path.text for path in active]
        report = collect(
            teacher, store, contexts, params, n=settings.k, progress=progress, description=f"chunk {chunk}"
        )
        if counter is not None:
            counter["requests"] = counter.get("requests", 0) + report.requested
        stored = _stored_or_none(store, teacher, contexts, params, settings.k)
        for path, context, candidates in zip(active, contexts, stored):
            if candidates is None:  # the teacher failed on this context: leave the path unfinished
                path.status = "unfinished"
                continue
            ends = [g.finish_reason == "stop" for g in candidates]
            ppl = candidate_perplexities(scorer, context, [g.text for g in candidates], ends)
            best = min(range(len(ppl)), key=ppl.__getitem__)
            path.chunks += 1
            if not ppl[best] < settings.threshold:
                path.status = "pruned"
                path.unselected_ppl.extend(ppl)
                continue
            path.selected_ppl.append(ppl[best])
            path.unselected_ppl.extend(p for i, p in enumerate(ppl) if i != best)
            path.text += candidates[best].text
            if ends[best]:
                path.status = "finished"
    for path in paths:
        if path.status == "running":
            path.status = "unfinished"
        if path.status == "finished" and checker is not None and not checker(path.prompt, path.text):
            path.status = "wrong"
    return paths


def _stored_or_none(
    store: ResponseStore,
    teacher: TextTeacher,
    contexts: Sequence[str],
    params: SamplingParams,
    k: int,
) -> list[Any]:
    """The stored candidates of each context, None where the store lacks some (a failed request)."""
    missing = store.missing(teacher.teacher_id, contexts, params, k)
    gaps = {contexts[i] for i in missing}
    return [None if c in gaps else store.get(teacher.teacher_id, [c], params, k)[0] for c in contexts]


def path_report(paths: Sequence[ReasoningPath], tokenizer: Any) -> dict[str, Any]:
    """Counts by status; selected paths' lengths (tokens); student perplexity selected vs not."""

    def mean(values: Sequence[float]) -> float | None:
        finite = [v for v in values if math.isfinite(v)]
        return statistics.fmean(finite) if finite else None

    kept = [p for p in paths if p.status == "finished"]
    lengths = [len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in kept]
    statuses = ("finished", "pruned", "unfinished", "wrong")
    counts = {status: sum(p.status == status for p in paths) for status in statuses}
    return {
        "paths": len(paths),
        **counts,
        "selected_mean_tokens": mean(lengths),
        "selected_mean_chunks": mean([p.chunks for p in kept]),
        "student_ppl_selected": mean([x for p in paths for x in p.selected_ppl]),
        "student_ppl_unselected": mean([x for p in paths for x in p.unselected_ppl]),
    }


def run_gen_ssd(
    student: nn.Module,
    tokenizer: Any,
    teacher: TextTeacher,
    store: ResponseStore,
    prompts: Sequence[str],
    teacher_params: SamplingParams,
    run_dir: str | Path,
    *,
    settings: GenSSDSettings | None = None,
    checker: Callable[[str, str], bool] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Cold start, path selection, fine-tune on the selected paths; `student` trained in place.

    The first `cold_start_prompts` prompts get full teacher responses (`teacher_params`) for the
    cold start; the remaining prompts are grown by selection. Returns a JSON-safe summary.
    """
    from kdkit.engine.settings import TrainConfig

    s = settings or GenSSDSettings()
    run_dir = Path(run_dir)

    def config(steps: int, samples: int) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=min(s.batch_size, samples),
            lr=s.lr,
            warmup_steps=min(10, steps // 10),
            seed=s.seed,
            checkpoint_every=max(steps // 2, 1),
            log_every=max(steps // 10, 1),
            mixed_precision="no",
            progress=progress,
        )

    cold_prompts, grow_prompts = list(prompts[: s.cold_start_prompts]), list(prompts[s.cold_start_prompts :])
    cold = None
    cold_samples: list[dict[str, Any]] = []
    if cold_prompts and s.cold_start_steps > 0:
        cold = collect(
            teacher, store, cold_prompts, teacher_params, progress=progress, description="cold start"
        )
        cold_samples = stored_samples(store, teacher.teacher_id, cold_prompts, teacher_params)
        fine_tune(
            student,
            tokenizer,
            cold_samples,
            config(s.cold_start_steps, len(cold_samples)),
            run_dir / "cold_start",
            description="cold start",
        )
    counter = {"requests": cold.requested if cold else 0}
    paths: list[ReasoningPath] = []
    start = 0
    while start < len(grow_prompts):
        group = max(s.batch_size, 1)
        if s.max_requests is not None:
            remaining = s.max_requests - counter["requests"]
            if remaining <= 0:
                break
            # Size the group by the chunks a path has taken so far (max_chunks before any), so the
            # budget is overshot by at most about one group's last chunks.
            chunks = statistics.fmean([p.chunks for p in paths]) if paths else s.max_chunks
            group = max(1, min(group, int(remaining // max(chunks, 1.0))))
        paths += select_paths(
            teacher,
            student,
            tokenizer,
            store,
            grow_prompts[start : start + group],
            s,
            checker=checker,
            progress=progress,
            counter=counter,
        )
        start += group
    selected = [{"prompt": p.prompt, "completion": p.text} for p in paths if p.status == "finished"]
    samples = selected + (cold_samples if s.finetune_on_cold_start else [])
    result = fine_tune(
        student,
        tokenizer,
        samples,
        config(s.finetune_steps, max(len(samples), 1)),
        run_dir / "finetune",
        description="fine-tune",
    )
    report = path_report(paths, tokenizer)
    if cold_samples:  # the length of a standard KD path, for comparison with the selected ones
        lengths = [
            len(tokenizer(c["completion"], add_special_tokens=False)["input_ids"]) for c in cold_samples
        ]
        report["teacher_full_mean_tokens"] = statistics.fmean(lengths)
    return {
        "cold_start_collection": cold.to_json() if cold else None,
        "teacher_requests": counter["requests"],
        "selection": report,
        "finetune_samples": len(samples),
        "finetune_final": result.final_losses,
        "settings": asdict(s),
    }


# ---------------------------------------------------------------------- the registered method


class GenSSDParams(TeacherSamplingParams):
    """Gen-SSD's options (see `GenSSDSettings`); teacher_* sample the cold-start responses and the
    candidate chunks."""

    k: PositiveInt = 4
    chunk_tokens: PositiveInt = 32
    threshold: float = Field(2.0, gt=1.0)
    max_chunks: PositiveInt = 16
    cold_start_prompts: int = Field(64, ge=0)
    cold_start_steps: int = Field(100, ge=0)
    finetune_steps: PositiveInt = 200
    lr: PositiveFloat = 3e-3
    batch_size: PositiveInt = 32
    finetune_on_cold_start: bool = True
    max_requests: PositiveInt | None = None
    seed: int = 0


@METHODS.register(
    "gen_ssd",
    "Gen-SSD: the student keeps the lowest-perplexity of k teacher chunks, prunes above a threshold",
)
class GenSSD(TextMethod):
    Params = GenSSDParams

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
        fields = {f.name for f in dataclasses.fields(GenSSDSettings)}
        values = params.model_dump()
        settings = GenSSDSettings(
            **{k: v for k, v in values.items() if k in fields},
            temperature=params.teacher_temperature,
            top_p=params.teacher_top_p,
        )
        return run_gen_ssd(
            student,
            tokenizer,
            teacher,
            store,
            prompts,
            params.sampling(),
            run_dir,
            settings=settings,
            checker=checker,
            progress=progress,
        )


__all__ = [
    "GenSSD",
    "GenSSDParams",
    "GenSSDSettings",
    "candidate_perplexities",
    "path_report",
    "run_gen_ssd",
    "select_paths",
]
