"""Language-model distillation end to end: teacher → students (one per method) → evaluation → report.

`run_lm(cfg)` is what `kdkit run` calls for `kind: lm`; `evaluate_lm_run(run_dir)` re-evaluates a
finished run folder (`kdkit eval`).

Run folder layout:
    config.json                      the validated config (`kind` tells `kdkit eval` what to load)
    students/<name>/                 engine output (metrics.jsonl, tb/), train.json (wall time,
                                     final loss terms, the resolved recipe)
    students/<name>/model/           the trained student as a plain Hugging Face folder (+ tokenizer)
    metrics.json, report.md, report.html, plots/    from `kdkit.report.write_report`

The engine's checkpoints are deleted once a student's model folder is written (an LM checkpoint
holds the optimizer state, ~3× the model); a killed run resumes unfinished students from theirs.
"""

from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdkit.config.lm import LMRunConfig, LMStudentConfig, LMStudentRun, LMTeacherConfig
from kdkit.models.lm import (
    build_causal_lm,
    derive_student,
    load_causal_lm,
    resolve_dtype,
    save_pretrained_folder,
)
from kdkit.models.tokenizers import check_vocabularies
from kdkit.pipelines.run_folder import read_json
from kdkit.pipelines.skeleton import run_students
from kdkit.report import lm_results_table, write_report
from kdkit.report.tables import exact_keys
from kdkit.settings import LMContext

Log = Callable[[str], None]
Batch = dict[str, Any]

COLUMNS_HEAD = [("model", "Model"), ("method", "Method"), ("perplexity", "Held-out perplexity")]
COLUMNS_TAIL = [
    ("agreement", "Top-1 agreement with teacher"),
    ("teacher_logp", "log p_T of own samples (nats/token)"),
    ("student_logp", "log p_S of own samples (nats/token)"),
    ("rkl_estimate", "KL(p_S‖p_T) estimate (nats/token)"),
    ("parameters", "Parameters"),
    ("train_time_s", "Train time (s)"),
    ("generation_share", "Generation share of step"),
]


@dataclass
class LMData:
    """Training samples, held-out samples, the collate function, and (arithmetic) graded problems."""

    train: Dataset
    held_out: Dataset
    collate: Callable[[list[Any]], Batch]
    problems: list[Any] | None = None


# ---------------------------------------------------------------------------- models


def load_teacher(cfg: LMRunConfig, *, dtype: str | None = None, log: Log = print) -> tuple[nn.Module, Any]:
    """The teacher (eval mode, CPU, `dtype` or `teacher.dtype`) and its tokenizer (with a pad token)."""
    return load_teacher_model(cfg.teacher, dtype=dtype, log=log)


def load_teacher_model(
    spec: LMTeacherConfig, *, dtype: str | None = None, log: Log = print
) -> tuple[nn.Module, Any]:
    """The teacher `spec` names (eval mode, CPU, `dtype` or `spec.dtype`) and its tokenizer."""
    dtype = dtype or spec.dtype
    if spec.source == "smollm2":
        from kdkit.models.smollm2 import load_smollm2

        model, tokenizer = load_smollm2(dtype)
    elif spec.source == "arithmetic":
        from kdkit.pipelines.teachers import get_arithmetic_teacher

        model, tokenizer, folder = get_arithmetic_teacher(spec.arithmetic)
        model = model.to(resolve_dtype(dtype))
        log(f"kdkit: arithmetic teacher from {folder}")
    else:
        model, tokenizer = load_causal_lm(spec.source, dtype=dtype)
    return model.eval(), tokenizer


def load_models(
    teacher_spec: LMTeacherConfig, student_spec: LMStudentConfig, *, log: Log = print
) -> tuple[nn.Module, Any, nn.Module, Any]:
    """(teacher in `teacher_spec.dtype`, its tokenizer, the initial student, the student's tokenizer).

    A student derived by layer selection copies the teacher's weights at full precision: the
    teacher is loaded in float32, the student derived, and only then is the teacher cast (e.g. to
    bf16), so a bf16 teacher does not leave the student with bf16-rounded weights.
    """
    derives = student_spec.keep_layers is not None and student_spec.copy_weights
    teacher, tokenizer = load_teacher_model(teacher_spec, dtype="float32" if derives else None, log=log)
    student, student_tokenizer = build_lm_student(student_spec, teacher, tokenizer)
    return teacher.to(resolve_dtype(teacher_spec.dtype)), tokenizer, student, student_tokenizer


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def build_student(cfg: LMRunConfig, teacher: nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """The initial student of `cfg.student` (see `build_lm_student`)."""
    return build_lm_student(cfg.student, teacher, tokenizer)


def build_lm_student(
    spec: LMStudentConfig, teacher: nn.Module | None, tokenizer: Any
) -> tuple[nn.Module, Any]:
    """The initial student (float `spec.dtype`, train mode) and its tokenizer.

    Deterministic for a config: every student of a run starts from these same weights. Refuses a
    student whose tokenizer differs from the teacher's (TokenizerMismatchError); vocabularies that
    differ only by embedding padding are aligned by the distiller. Without a teacher model (a
    text-only teacher), `tokenizer` is the student's and a config-built student's vocabulary is its.
    """
    torch.manual_seed(spec.seed)
    student_tokenizer = tokenizer
    if spec.keep_layers is not None:
        student = derive_student(
            teacher,
            keep_layers=spec.keep_layers,
            intermediate_size=spec.intermediate_size,
            copy_weights=spec.copy_weights,
        )
    elif spec.path is not None:
        student, student_tokenizer = load_causal_lm(spec.path, dtype=spec.dtype)
    else:
        options = dict(spec.config or {})
        options.setdefault("vocab_size", len(tokenizer) if teacher is None else _vocab_size(teacher))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            options.setdefault(key, getattr(tokenizer, key))
        student = build_causal_lm(options, seed=spec.seed)
        student.generation_config.pad_token_id = tokenizer.pad_token_id
        student.generation_config.eos_token_id = tokenizer.eos_token_id
    if teacher is not None:
        check_vocabularies(tokenizer, student_tokenizer, _vocab_size(teacher), _vocab_size(student))
    return student.to(resolve_dtype(spec.dtype)).train(), student_tokenizer


def build_distiller(
    student_cfg: LMStudentRun,
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    student_tokenizer: Any = None,
) -> nn.Module:
    """The `LMDistiller` of the student's method and parameters (teacher only if needed).

    The mixture sampler's coin uses Python's global `random`, which the engine seeds from
    `TrainConfig.seed` and restores from checkpoints, so a resumed run draws the same sources.
    """
    ctx = LMContext.from_tokenizer(tokenizer, extra_eos=generation_eos_ids(teacher))
    return student_cfg.method_class().build(
        student_cfg.method_params(),
        student,
        teacher,
        ctx,
        tokenizers=(tokenizer, student_tokenizer or tokenizer),
    )


def generation_eos_ids(model: nn.Module) -> tuple[int, ...]:
    """Every EOS id of a model's generation config (chat models often list several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))


# ---------------------------------------------------------------------------- data


class _Records(Dataset):
    """A list of dict samples as a map-style dataset."""

    def __init__(self, records: Sequence[Any]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self.records[index]


def _read_jsonl(path: str | Path) -> list[Any]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def split_jsonl(data: Any) -> tuple[list[Any], list[Any]]:
    """(training records, held-out records) of a jsonl data config: held-out from `data.eval_path`,
    else the last `data.eval_size` records of `data.path`."""
    records = _read_jsonl(data.path)
    if data.eval_path is not None:
        return records, _read_jsonl(data.eval_path)
    if len(records) <= data.eval_size:
        raise ValueError(
            f"{data.path} has {len(records)} records; holding out eval_size={data.eval_size} leaves "
            "none to train on (set data.eval_path or a smaller data.eval_size)"
        )
    return records[: -data.eval_size], records[-data.eval_size :]


def load_lm_data(cfg: LMRunConfig, tokenizer: Any) -> LMData:
    """Training and held-out samples for the configured dataset (held-out capped at eval_size)."""
    data = cfg.data
    if data.dataset == "arithmetic":
        from kdkit.samplers.collate import PromptCompletionCollator
        from kdkit.tasks.arithmetic import arithmetic_dataset, make_problems

        train = _Records(arithmetic_dataset(data.train_size, tuple(data.train_digits), seed=data.seed))
        # distinct seeds: held-out problems are drawn independently of the training ones
        held_out = _Records(arithmetic_dataset(data.eval_size, tuple(data.eval_digits), seed=data.seed + 1))
        problems = make_problems(cfg.eval.exact_match_problems, tuple(data.eval_digits), seed=data.seed + 2)
        return LMData(train, held_out, PromptCompletionCollator(tokenizer), problems or None)
    from kdkit.data.text import text_collator

    if data.dataset == "python_docs":
        from kdkit.data.python_docs import load_python_docs

        options = {"block_size": data.block_size, "prompt_tokens": data.prompt_tokens, "root": data.root}
        train = load_python_docs(
            tokenizer, "train", max_files=data.max_files, max_tokens=data.max_tokens, **options
        )
        held_out = load_python_docs(tokenizer, "held_out", max_tokens=data.eval_max_tokens, **options)
    else:
        from kdkit.data.text import TextDataset

        records, eval_records = split_jsonl(data)
        train = TextDataset(records, tokenizer, max_length=data.max_length)
        held_out = TextDataset(eval_records, tokenizer, max_length=data.max_length)
    count = min(len(held_out), data.eval_size)
    held_out = torch.utils.data.Subset(held_out, range(count))
    return LMData(train, held_out, text_collator(tokenizer))


def eval_batches(
    dataset: Dataset, collate: Callable[[list[Any]], Batch], batch_size: int, limit: int
) -> list[Batch]:
    """The first `limit` samples of `dataset` collated in batches of `batch_size`."""
    items = [dataset[i] for i in range(min(limit, len(dataset)))]
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


# ---------------------------------------------------------------------------- run


class LMRun:
    """The skeleton's adapter for `kind: lm` (see `kdkit.pipelines.skeleton`)."""

    delete_checkpoints = True  # an LM checkpoint holds the optimizer state, ~3× the model

    def __init__(self, cfg: LMRunConfig, log: Log = print) -> None:
        self.cfg, self.log = cfg, log

    def prepare(self, run_dir: Path) -> None:
        self.teacher, self.tokenizer, self.initial, self.student_tokenizer = load_models(
            self.cfg.teacher, self.cfg.student, log=self.log
        )
        self.data = load_lm_data(self.cfg, self.tokenizer)
        from kdkit.pipelines.cache import prepare_cached_training

        # students that train from a teacher-logit cache: build it if needed, check it, index samples
        self.cache_folders, self.train_set, self.collate = prepare_cached_training(
            self.cfg,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            train=self.data.train,
            collate=self.data.collate,
            log=self.log,
        )
        self.log(
            f"kdkit: {len(self.data.train)} training samples, {len(self.data.held_out)} held-out samples"
        )

    def finished(self, out: Path) -> bool:
        return (out / "model" / "config.json").is_file()

    def build_distiller(self, student_cfg: LMStudentRun) -> nn.Module:
        from kdkit.pipelines.cache import resolve_student

        student = copy.deepcopy(self.initial)  # every student starts from the same weights
        student_cfg = resolve_student(student_cfg, self.cache_folders)  # a cache name -> its folder
        return build_distiller(student_cfg, student, self.teacher, self.tokenizer, self.student_tokenizer)

    def describe(self, student_cfg: LMStudentRun) -> str:
        return describe_student(student_cfg)

    def save_student(self, distiller: nn.Module, student_cfg: LMStudentRun, out: Path) -> None:
        save_pretrained_folder(distiller.student.cpu().eval(), self.student_tokenizer, out / "model")

    def evaluate(self, run_dir: Path) -> Path:
        return evaluate_lm_run(
            run_dir,
            cfg=self.cfg,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            initial=self.initial,
            data=self.data,
            log=self.log,
        )


def run_lm(
    cfg: LMRunConfig, *, resume: bool = False, run_dir: str | Path | None = None, log: Log = print
) -> Path:
    """Build the teacher, train every student on the same budget, evaluate, write the report.

    run_dir: default `output_dir/name/<UTC timestamp>`; with resume=True and no run_dir, the latest
    folder under `output_dir/name`. Resuming skips finished students (their model folder exists)
    and continues unfinished ones from their latest checkpoint. Returns the run folder.
    """
    return run_students(cfg, LMRun(cfg, log), resume=resume, run_dir=run_dir, log=log)


# ---------------------------------------------------------------------------- evaluation


def eval_device() -> torch.device:
    """Where models are evaluated: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_model(
    model: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    cfg: LMRunConfig,
    data: LMData,
    *,
    is_teacher: bool = False,
) -> dict[str, Any]:
    """One model's held-out metrics (nats per token; fractions in [0, 1]).

    perplexity / nll on held-out label tokens; agreement = top-1 agreement with the teacher on the
    same text; teacher_logp / student_logp = mean log-probability that the teacher / the model
    gives the model's own samples (rkl_estimate = their difference, ≈ KL(p_S‖p_T) per token);
    exact_match_d<k> = greedy exact match on arithmetic problems with k-digit operands.
    """
    from kdkit.eval import count_parameters
    from kdkit.eval.lm import perplexity, sample_log_likelihoods, token_agreement
    from kdkit.samplers import GenerationSettings

    batches = eval_batches(data.held_out, data.collate, cfg.eval.batch_size, len(data.held_out))
    row: dict[str, Any] = {}
    ppl = perplexity(model, batches)
    row |= {"perplexity": ppl["perplexity"], "nll": ppl["nll"], "eval_tokens": ppl["tokens"]}
    if is_teacher:
        row["agreement"] = 1.0
    else:
        row["agreement"] = token_agreement(model, teacher, batches)["agreement"]
    if cfg.eval.samples > 0:
        prompts = eval_batches(data.held_out, data.collate, cfg.eval.batch_size, cfg.eval.samples)
        settings = GenerationSettings(
            temperature=cfg.eval.sampling_temperature,
            max_new_tokens=cfg.eval.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(cfg.eval.seed)  # the same sampling stream for every model
        sampled = sample_log_likelihoods(model, teacher, prompts, settings)
        row |= {k: sampled[k] for k in ("teacher_logp", "student_logp", "rkl_estimate")}
    if data.problems:
        from kdkit.tasks.arithmetic import exact_match_by_length

        by_length = exact_match_by_length(model, tokenizer, data.problems, batch_size=128)
        row |= {f"exact_match_d{d}": acc for d, acc in by_length.items()}
        row["exact_match"] = statistics.fmean(by_length.values())
    row["parameters"] = count_parameters(model)
    return row


def generation_share(history: Path, steps: int, grad_accum: int, wall_time_s: float) -> float | None:
    """Fraction of training wall time spent sampling: mean logged generation seconds per
    micro-batch × micro-batches / wall time (None without a history)."""
    if not history.is_file():
        return None
    values = [json.loads(line).get("diag/gen_s") for line in history.read_text().splitlines() if line.strip()]
    values = [v for v in values if v is not None]
    if not values or wall_time_s <= 0:
        return None
    return min(statistics.fmean(values) * steps * grad_accum / wall_time_s, 1.0)


def evaluate_lm_run(
    run_dir: str | Path,
    *,
    cfg: LMRunConfig | None = None,
    teacher: nn.Module | None = None,
    tokenizer: Any | None = None,
    initial: nn.Module | None = None,
    data: LMData | None = None,
    log: Log = print,
) -> Path:
    """Evaluate the teacher, the initial student and every finished student; (re)write the report.

    Reads config.json where `cfg` is not given and rebuilds what is missing (teacher, data, the
    initial student — deterministic from the config). Returns the run folder.
    """
    run_dir = Path(run_dir)
    if cfg is None:
        cfg = LMRunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
    if teacher is None or tokenizer is None or initial is None:
        teacher, tokenizer, initial, _ = load_models(cfg.teacher, cfg.student, log=log)
    if data is None:
        data = load_lm_data(cfg, tokenizer)
    device = eval_device()
    teacher = teacher.to(device).eval()
    log(f"kdkit: evaluating on {len(data.held_out)} held-out samples")

    models: list[tuple[str, str, nn.Module, Path | None]] = [
        ("teacher", "teacher", teacher, None),
        ("student_init", "initial student (no training)", initial, None),
    ]
    from transformers import AutoModelForCausalLM

    for student_cfg in cfg.students:
        folder = run_dir / "students" / student_cfg.name / "model"
        if not (folder / "config.json").is_file():
            log(f"kdkit: student {student_cfg.name} has no saved model; left out of the report")
            continue
        model = AutoModelForCausalLM.from_pretrained(folder)
        models.append((student_cfg.name, student_cfg.method, model, folder.parent))

    rows: list[dict[str, Any]] = []
    histories: dict[str, Path] = {}
    privacy_notes: list[str] = []
    for name, method, model, folder in models:
        log(f"kdkit: evaluating {name}")
        model = model.to(device).eval()
        row: dict[str, Any] = {"model": name, "method": method}
        row |= evaluate_model(model, teacher, tokenizer, cfg, data, is_teacher=model is teacher)
        if folder is not None:
            info = read_json(folder / "train.json")
            row["train_time_s"] = info.get("wall_time_s")
            row["steps"] = info.get("steps")
            row["generation_share"] = generation_share(
                folder / "metrics.jsonl",
                info.get("steps", 0),
                cfg.train.grad_accum_steps,
                info.get("wall_time_s", 0.0),
            )
            losses = info.get("final_losses", {})
            row["kd_raw"] = losses.get("diag/kd_raw")
            row["ce_raw"] = losses.get("diag/ce_raw")
            if (folder / "metrics.jsonl").is_file():
                histories[name] = folder / "metrics.jsonl"
            if (folder / "privacy.json").is_file():  # a DP-SGD student: its (ε, δ) and what they cover
                statement = read_json(folder / "privacy.json")
                row["epsilon"], row["delta"] = statement["epsilon"], statement["delta"]
                privacy_notes.append(privacy_note(name, statement))
        if model is not teacher:
            model.cpu()
        rows.append(row)

    write_report(
        run_dir,
        title=f"Language-model distillation: {cfg.name}",
        rows=rows,
        columns=report_columns(rows),
        histories=histories,
        config=cfg.model_dump(mode="json"),
        notes=report_notes(cfg, rows, data) + privacy_notes,
        extra={"students": {s.name: s.method_params().model_dump(mode="json") for s in cfg.students}},
        scatter=("parameters", "perplexity"),
    )
    log(lm_results_table(rows))
    log(f"kdkit: report written to {run_dir / 'report.html'}")
    return run_dir


def report_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The fixed columns plus one exact-match column per problem length present (and ε, δ for DP runs)."""
    exact = [(k, f"Exact match, {k.removeprefix('exact_match_d')}-digit") for k in exact_keys(rows)]
    private = [("epsilon", "ε (DP-SGD)"), ("delta", "δ")] if any("epsilon" in r for r in rows) else []
    return COLUMNS_HEAD + private + exact + COLUMNS_TAIL


def privacy_note(name: str, statement: dict[str, Any]) -> str:
    """One report note: a DP student's (ε, δ), its parameters, what it covers and what it does not."""
    p = statement["parameters"]
    return (
        f"Privacy of {name}: (ε, δ) = ({statement['epsilon']:.3g}, {statement['delta']:.3g}), "
        f"{statement['accountant'].upper()} accountant, {statement['steps_taken']} steps, "
        f"q = {p['sample_rate']:.4g} "
        f"over N = {p['records']} records, σ = {p['noise_multiplier']:.4g}, C = {p['max_grad_norm']:.3g}. "
        f"Covered: {statement['covered']}. Sampling assumed: {statement['sampling_scheme']}. "
        f"Not covered: {'; '.join(statement['not_covered'])}. Randomness: {statement['randomness']}."
    )


def describe_student(student_cfg: LMStudentRun) -> str:
    """One line: sampler (and its sampling temperature), teacher signal, objective (and the loss's
    distillation temperature), term weights — the two temperatures always named apart."""
    method, p = student_cfg.method_class(), student_cfg.method_params()
    if hasattr(method, "describe"):  # private methods describe themselves (no kd/ce weights)
        return f"{student_cfg.method}: {method.describe(p)}"
    parts = method.parts(p)
    sampler = parts.sampler + (f" (λ={p.lmbda:g})" if hasattr(p, "lmbda") else "")
    sampling = (
        f"sampling temperature {p.sampling_temperature:g}"
        if hasattr(p, "sampling_temperature")
        else "no sampling"
    )
    objective = parts.objective
    if hasattr(p, "divergence"):
        own = ", ".join(f"{k}={v}" for k, v in p.divergence_params.items())
        objective += f" {p.divergence}({own})" if own else f" {p.divergence}"
    if hasattr(p, "temperature"):
        objective += f" at distillation temperature {p.temperature:g}"
    if hasattr(p, "gamma"):
        objective += f" (γ={p.gamma:g})"
    return (
        f"{student_cfg.method}: sequences from {sampler}, {sampling}; teacher signal {parts.signal}; "
        f"objective {objective}; kd_weight {p.kd_weight:g}, ce_weight {p.ce_weight:g}"
    )


def report_notes(cfg: LMRunConfig, rows: list[dict[str, Any]], data: LMData) -> list[str]:
    notes = [
        f"Teacher: {cfg.teacher.source} ({cfg.teacher.dtype}). Student: "
        + (
            f"teacher layers {cfg.student.keep_layers}"
            + (f", MLP width {cfg.student.intermediate_size}" if cfg.student.intermediate_size else "")
            if cfg.student.keep_layers is not None
            else (cfg.student.path or f"built from config {cfg.student.config}")
        )
        + f"; every student trains {cfg.train.steps} steps of batch {cfg.train.batch_size} × "
        f"{cfg.train.grad_accum_steps} (same initial weights, seed and data order).",
        f"Held-out: {len(data.held_out)} samples of {cfg.data.dataset}; perplexity and agreement over "
        "completion (label) tokens; samples scored from the first "
        f"{cfg.eval.samples} held-out prompts at sampling temperature {cfg.eval.sampling_temperature:g}, "
        f"up to {cfg.eval.max_new_tokens} new tokens.",
    ]
    for student in cfg.students:
        notes.append(f"Student {student.name} — {describe_student(student)}.")
    for row in rows:
        if row.get("kd_raw") is not None or row.get("ce_raw") is not None:
            kd, ce = row.get("kd_raw"), row.get("ce_raw")
            parts = [f"kd {kd:.4g}" if kd is not None else None, f"ce {ce:.4g}" if ce is not None else None]
            notes.append(
                f"Unweighted loss terms of {row['model']} over its last logging window (nats/token): "
                + ", ".join(p for p in parts if p)
                + "."
            )
    if data.problems:
        low, high = cfg.data.train_digits
        notes.append(
            f"Arithmetic: trained on {low}–{high}-digit operands; exact match (greedy) on "
            f"{len(data.problems)} problems with {cfg.data.eval_digits[0]}–{cfg.data.eval_digits[1]}-digit "
            "operands; lengths past the training range show how errors compound (exposure bias)."
        )
    return notes


__all__ = [
    "LMData",
    "build_distiller",
    "build_lm_student",
    "build_student",
    "eval_batches",
    "eval_device",
    "evaluate_lm_run",
    "evaluate_model",
    "load_lm_data",
    "load_models",
    "load_teacher",
    "load_teacher_model",
    "LMRun",
    "describe_student",
    "generation_eos_ids",
    "run_lm",
    "split_jsonl",
]
