"""Black-box distillation end to end (`kind: text`): a text teacher → students (one per text method)
→ evaluation → report.

`run_text(cfg)` is what `kdkit run` calls for `kind: text`; `evaluate_text_run(run_dir)` re-evaluates
a run folder (`kdkit eval`) without asking the teacher anything.

Run folder (the skeleton's, see `kdkit.pipelines.skeleton`, plus):
    responses.sqlite            the durable response store: every teacher response (and SODA's
                                student snapshot) the run paid for; a rerun with --resume asks the
                                teacher only for what it lacks
    teacher.json                the teacher's description (its store id; never a credential)
    students/<name>/            the method's stages (seqkd/, warmup/, dpo/, cold_start/, ...:
                                metrics.jsonl), train.json (the method's summary, new teacher
                                responses, wall time), model/ (a plain Hugging Face folder)
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdkit.config.text import TextRunConfig, TextStudentRun, TextTeacherConfig
from kdkit.models.lm import ensure_pad_token, save_pretrained_folder
from kdkit.pipelines.lm import (
    build_lm_student,
    eval_batches,
    eval_device,
    load_models,
    load_teacher_model,
    split_jsonl,
)
from kdkit.pipelines.run_folder import read_json
from kdkit.pipelines.skeleton import run_students
from kdkit.registry import METHODS
from kdkit.report import format_value, write_report
from kdkit.report.tables import exact_keys
from kdkit.teachers import HFTeacher, ResponseStore, SamplingParams, TextTeacher
from kdkit.teachers.base import stable_hash

Log = Callable[[str], None]
STORE = "responses.sqlite"


@dataclass
class TextData:
    """Training prompts, held-out records ({"prompt"[, "completion"]}), and for arithmetic the
    graded problems and the answer checker the methods filter with (`checker(prompt, text)`)."""

    prompts: list[str]
    held_out: list[dict[str, Any]]
    problems: list[Any] | None = None
    checker: Callable[[str, str], bool] | None = None


def load_text_data(cfg: TextRunConfig) -> TextData:
    data = cfg.data
    if data.dataset == "arithmetic":
        from kdkit.tasks.arithmetic import arithmetic_dataset, check_answer, make_problems

        train = make_problems(data.train_size, tuple(data.train_digits), seed=data.seed)
        answers = {p.prompt: p for p in train}

        def checker(prompt: str, text: str) -> bool:
            return prompt in answers and check_answer(answers[prompt], text)

        held_out = arithmetic_dataset(data.eval_size, tuple(data.eval_digits), seed=data.seed + 1)
        problems = make_problems(cfg.eval.exact_match_problems, tuple(data.eval_digits), seed=data.seed + 2)
        return TextData(list(answers), held_out, problems or None, checker)
    records, held_out = split_jsonl(data)
    for where, rows in ((data.path, records), (data.eval_path or data.path, held_out)):
        for line, record in enumerate(rows, start=1):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(
                    f'{where}: record {line} needs a "prompt" string (and optionally "completion")'
                )
    prompts = list(dict.fromkeys(r["prompt"] for r in records))  # each prompt asked once
    return TextData(prompts, held_out[: data.eval_size])


# ---------------------------------------------------------------------------- models


def load_text_models(cfg: TextRunConfig, *, log: Log = print) -> tuple[nn.Module | None, Any, nn.Module, Any]:
    """(the local teacher model or None, its tokenizer or None, the initial student, its tokenizer).

    A keep_layers student is derived from the local teacher as for `kind: lm`. Otherwise the student
    comes from student.path (its own tokenizer) or student.config with student.tokenizer (default:
    the local teacher's): teacher and student exchange only text, so their tokenizers may differ.
    """
    teacher = tokenizer = None
    if cfg.teacher.local is not None:
        if cfg.student.keep_layers is not None:
            return load_models(cfg.teacher.local, cfg.student, log=log)
        teacher, tokenizer = load_teacher_model(cfg.teacher.local, log=log)
    student_tokenizer = tokenizer
    if cfg.student.tokenizer is not None:
        student_tokenizer = load_tokenizer(cfg.student.tokenizer)
    student, student_tokenizer = build_lm_student(cfg.student, None, student_tokenizer)
    return teacher, tokenizer, student, student_tokenizer


def load_tokenizer(name: str) -> Any:
    """The tokenizer a config names: "arithmetic" (the arithmetic task's character tokenizer) or a
    tokenizer folder / hub id (given a pad token if it has none)."""
    if name == "arithmetic":
        from kdkit.tasks.arithmetic import arithmetic_tokenizer

        return arithmetic_tokenizer()
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(name))


def build_text_teacher(spec: TextTeacherConfig, model: nn.Module | None, tokenizer: Any) -> TextTeacher:
    """The `TextTeacher` of the config (the API key is read from its environment variable here)."""
    if spec.api is not None:
        from kdkit.teachers import OpenAITeacher

        options = spec.api.model_dump()
        return OpenAITeacher(options.pop("base_url"), options.pop("model"), **options)
    if spec.vllm is not None:
        from kdkit.teachers import VLLMTeacher

        return VLLMTeacher(spec.vllm.model, **spec.vllm.engine)
    local = spec.local
    assert local is not None and model is not None
    # the id names what determines the teacher, so another teacher never reuses these responses
    identity = stable_hash(local.model_dump(mode="json", exclude={"batch_size"}))
    return HFTeacher(
        model, tokenizer, teacher_id=f"local:{local.source}:{identity}", batch_size=local.batch_size
    )


# ---------------------------------------------------------------------------- run


def describe_student(student_cfg: TextStudentRun) -> str:
    params = student_cfg.method_params().model_dump(mode="json")
    shown = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{student_cfg.method} ({METHODS.describe(student_cfg.method)}); {shown}"


class TextRun:
    """The skeleton's adapter for `kind: text`: each student trains through its method's `run`."""

    delete_checkpoints = True
    train_set = None
    collate = None

    def __init__(self, cfg: TextRunConfig, log: Log = print) -> None:
        self.cfg, self.log = cfg, log

    def prepare(self, run_dir: Path) -> None:
        self.teacher_model, self.teacher_tokenizer, self.initial, self.tokenizer = load_text_models(
            self.cfg, log=self.log
        )
        self.teacher = build_text_teacher(self.cfg.teacher, self.teacher_model, self.teacher_tokenizer)
        (run_dir / "teacher.json").write_text(json.dumps(self.teacher.describe(), indent=2) + "\n")
        self.data = load_text_data(self.cfg)
        self.store = ResponseStore(run_dir / STORE)
        self.log(
            f"kdkit: teacher {self.teacher.teacher_id}; {len(self.data.prompts)} training prompts, "
            f"{len(self.data.held_out)} held-out records; store {run_dir / STORE}"
        )

    def finished(self, out: Path) -> bool:
        return (out / "model" / "config.json").is_file()

    def describe(self, student_cfg: TextStudentRun) -> str:
        return describe_student(student_cfg)

    def train_student(self, student_cfg: TextStudentRun, out: Path, *, resume: bool) -> dict[str, Any]:
        """The method's stages from the shared initial weights (they resume from their checkpoints
        in `out` and from the store); saves the student to out/model."""
        torch.manual_seed(self.cfg.seed)
        student = copy.deepcopy(self.initial)
        params = student_cfg.method_params()
        before = self.store.count(self.teacher.teacher_id)
        started = time.perf_counter()
        summary = student_cfg.method_class().run(
            params,
            student=student,
            tokenizer=self.tokenizer,
            teacher=self.teacher,
            store=self.store,
            prompts=self.data.prompts,
            run_dir=out,
            checker=self.data.checker,
            progress=self.cfg.progress,
        )
        save_pretrained_folder(student.cpu().eval(), self.tokenizer, out / "model")
        return {
            "method": student_cfg.method,
            "params": params.model_dump(mode="json"),
            # both measured in the session that finished the student
            "wall_time_s": time.perf_counter() - started,
            "teacher_responses": self.store.count(self.teacher.teacher_id) - before,
            "summary": summary,
        }

    def evaluate(self, run_dir: Path) -> Path:
        self.store.close()
        return evaluate_text_run(
            run_dir,
            cfg=self.cfg,
            models=(self.teacher_model, self.teacher_tokenizer, self.initial, self.tokenizer),
            data=self.data,
            log=self.log,
        )


def run_text(
    cfg: TextRunConfig, *, resume: bool = False, run_dir: str | Path | None = None, log: Log = print
) -> Path:
    """Train every student from the text teacher, evaluate, write the report; returns the run folder.

    resume=True reuses the latest run folder: finished students are skipped, unfinished ones
    continue from their stages' checkpoints, and the teacher is asked only for responses the run's
    store lacks.
    """
    return run_students(cfg, TextRun(cfg, log), resume=resume, run_dir=run_dir, log=log)


# ---------------------------------------------------------------------------- evaluation


def evaluate_text_model(
    model: nn.Module, tokenizer: Any, cfg: TextRunConfig, data: TextData
) -> dict[str, Any]:
    """One model's held-out metrics: perplexity of the reference completions (nats → exp), greedy
    exact match per operand length (arithmetic), parameters, and a few greedy generations."""
    from kdkit.eval import count_parameters

    row: dict[str, Any] = {}
    references = [r for r in data.held_out if isinstance(r.get("completion"), str)]
    if references:
        from kdkit.eval.lm import perplexity
        from kdkit.samplers.collate import PromptCompletionCollator

        batches = eval_batches(
            references, PromptCompletionCollator(tokenizer), cfg.eval.batch_size, len(references)
        )
        ppl = perplexity(model, batches)
        row |= {"perplexity": ppl["perplexity"], "nll": ppl["nll"], "eval_tokens": ppl["tokens"]}
    if data.problems:
        from kdkit.tasks.arithmetic import exact_match_by_length

        by_length = exact_match_by_length(model, tokenizer, data.problems, batch_size=cfg.eval.batch_size)
        row |= {f"exact_match_d{d}": acc for d, acc in by_length.items()}
        row["exact_match"] = statistics.fmean(by_length.values())
    row["parameters"] = count_parameters(model)
    prompts = [r["prompt"] for r in data.held_out[: cfg.eval.samples]]
    if prompts:
        greedy = SamplingParams(temperature=0.0, max_tokens=cfg.eval.max_new_tokens)
        texts = HFTeacher(model, tokenizer).generate(prompts, greedy)
        row["samples"] = [{"prompt": p, "text": t[0].text} for p, t in zip(prompts, texts)]
    return row


def store_summary(run_dir: Path, tokenizer: Any) -> dict[str, Any]:
    """What the run's store holds from the teacher: responses, distinct prompts, tokens (counted
    with the student's tokenizer), prompts whose requests failed and are still pending."""
    teacher = read_json(run_dir / "teacher.json")
    if not (run_dir / STORE).is_file() or "teacher_id" not in teacher:
        return {}
    with ResponseStore(run_dir / STORE) as store:
        records = list(store.records(teacher["teacher_id"]))
        failures = store.failures(teacher["teacher_id"])
    tokens = sum(len(tokenizer(r.generation.text, add_special_tokens=False)["input_ids"]) for r in records)
    prompts = {json.dumps(r.prompt) for r in records}
    return {
        "teacher": teacher,
        "responses": len(records),
        "prompts": len(prompts),
        "tokens": tokens,
        "failed_prompts": len(failures),
    }


def evaluate_text_run(
    run_dir: str | Path,
    *,
    cfg: TextRunConfig | None = None,
    models: tuple[nn.Module | None, Any, nn.Module, Any] | None = None,
    data: TextData | None = None,
    log: Log = print,
) -> Path:
    """Evaluate the local teacher (if any), the initial student and every finished student;
    (re)write the report. Rebuilds what is not given from config.json; never calls the teacher."""
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = TextRunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
    teacher_model, teacher_tokenizer, initial, tokenizer = models or load_text_models(cfg, log=log)
    data = data or load_text_data(cfg)
    entries: list[tuple[str, str, nn.Module, Any, Path | None]] = []
    if teacher_model is not None:
        entries.append(("teacher", "teacher (local)", teacher_model, teacher_tokenizer, None))
    entries.append(("student_init", "initial student (no training)", initial, tokenizer, None))
    for student_cfg in cfg.students:
        folder = run_dir / "students" / student_cfg.name
        if not (folder / "model" / "config.json").is_file():
            log(f"kdkit: student {student_cfg.name} has no saved model; left out of the report")
            continue
        model = AutoModelForCausalLM.from_pretrained(folder / "model")
        entries.append((student_cfg.name, student_cfg.method, model, tokenizer, folder))

    rows: list[dict[str, Any]] = []
    histories: dict[str, Path] = {}
    for name, method, model, model_tokenizer, folder in entries:
        log(f"kdkit: evaluating {name}")
        row: dict[str, Any] = {"model": name, "method": method}
        row |= evaluate_text_model(model.to(eval_device()).eval(), model_tokenizer, cfg, data)
        model.cpu()
        if folder is not None:
            info = read_json(folder / "train.json")
            row["train_time_s"] = info.get("wall_time_s")
            row["teacher_responses"] = info.get("teacher_responses")
            for history in sorted(folder.glob("*/metrics.jsonl")):  # one per stage of the method
                histories[f"{name}/{history.parent.name}"] = history
        rows.append(row)

    store = store_summary(run_dir, tokenizer)
    samples = {row["model"]: row.pop("samples", []) for row in rows}
    columns = report_columns(rows)
    write_report(
        run_dir,
        title=f"Black-box distillation: {cfg.name}",
        rows=rows,
        columns=columns,
        histories=histories,
        config=cfg.model_dump(mode="json"),
        notes=report_notes(cfg, data, store, samples),
        extra={
            "students": {s.name: s.method_params().model_dump(mode="json") for s in cfg.students},
            "store": store,
            "samples": samples,
        },
        scatter=("parameters", "exact_match" if data.problems else "perplexity"),
    )
    for row in rows:
        log("kdkit:   " + "  ".join(f"{title}: {format_value(key, row.get(key))}" for key, title in columns))
    log(f"kdkit: report written to {run_dir / 'report.html'}")
    return run_dir


def report_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    exact = [(k, f"Exact match, {k.removeprefix('exact_match_d')}-digit") for k in exact_keys(rows)]
    ppl = (
        [("perplexity", "Held-out perplexity (reference completions)")]
        if any("perplexity" in r for r in rows)
        else []
    )
    return [
        ("model", "Model"),
        ("method", "Method"),
        *exact,
        *ppl,
        ("teacher_responses", "New teacher responses"),
        ("parameters", "Parameters"),
        ("train_time_s", "Train time (s)"),
    ]


def report_notes(
    cfg: TextRunConfig, data: TextData, store: dict[str, Any], samples: dict[str, list[dict[str, str]]]
) -> list[str]:
    teacher = store.get("teacher") or {"teacher_id": cfg.teacher.form}
    notes = [
        f"Teacher ({cfg.teacher.form}): {teacher['teacher_id']}. "
        + (
            f"The run's store holds {store['responses']} teacher responses to {store['prompts']} prompts "
            f"({store['tokens']} tokens by the student's tokenizer; {store['failed_prompts']} prompts failed "
            "and would be asked again). New teacher responses per student: what its run (in the session "
            "that finished it) added to the store; responses an earlier student paid for are reused."
            if store
            else "No response store found."
        ),
        f"Students: {len(cfg.students)}, all from the same initial weights (student.seed {cfg.student.seed}) "
        f"and torch seed {cfg.seed}, on {len(data.prompts)} training prompts.",
    ]
    notes += [f"Student {s.name} — {describe_student(s)}." for s in cfg.students]
    if data.problems:
        low, high = cfg.data.train_digits
        notes.append(
            f"Arithmetic: prompts with {low}–{high}-digit operands; exact match (greedy) on "
            f"{len(data.problems)} problems with {cfg.data.eval_digits[0]}–{cfg.data.eval_digits[1]}-digit "
            "operands."
        )
    for name, shown in samples.items():
        if shown:
            notes.append(
                f"Greedy samples of {name}: " + "; ".join(f"{s['prompt']!r} → {s['text']!r}" for s in shown)
            )
    return notes


__all__ = [
    "TextData",
    "TextRun",
    "build_text_teacher",
    "evaluate_text_model",
    "evaluate_text_run",
    "load_text_data",
    "load_text_models",
    "load_tokenizer",
    "run_text",
    "store_summary",
]
