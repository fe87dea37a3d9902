"""A classifier run over models and data named by source: files → teacher (fine-tuned once, cached)
→ students (each through `kdkit.distill`, sharing one cache of teacher logits) → one report.

Run folder: config.json / config.yaml, students/<name>/ (history, the trained model), metrics.json,
report.md, report.html, plots/ — the layout of every kdkit run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kdkit.config.any_model import AnyModelRunConfig, FilesDataConfig, SourceModelConfig
from kdkit.data.examples import Examples, as_examples, default_image_transform
from kdkit.data.generic import check_columns, load_files
from kdkit.methods.any_model import LogitsAdapter
from kdkit.models.builders import LOWRANK_FILE, derive_student, factorize, load_student
from kdkit.models.hf import load_model, load_tokenizer
from kdkit.pipelines.distill import _evaluate_examples, check_models_and_data, distill, predict
from kdkit.pipelines.run_folder import resolve_run_dir

Log = Callable[[str], None]


def load_split(data: FilesDataConfig, which: str) -> Any:
    """data.train or data.eval as a `datasets.Dataset`, its named columns checked."""
    files = getattr(data, which)
    dataset = load_files(files, format=data.format)
    check_columns(dataset, data.input_column, data.label_column, where=f"data.{which}")
    return dataset


def build_teacher(cfg: AnyModelRunConfig, train_data: Any, eval_data: Any, log: Log) -> tuple[nn.Module, str]:
    """The teacher module and the source its tokenizer comes from (fine-tuned first if asked)."""
    spec = cfg.teacher
    assert spec.source is not None
    if spec.finetune is None:
        model = load_model(spec.source, task=spec.task, num_labels=spec.num_labels, kwargs=spec.kwargs)
        return model, spec.source
    from kdkit.pipelines.finetune import finetuned_teacher

    if spec.num_labels is None:
        raise ValueError("teacher.finetune needs teacher.num_labels (the width of the new head)")
    folder = finetuned_teacher(
        spec.source, train_data, eval_data=eval_data, task=spec.task, num_labels=spec.num_labels,
        name=f"{cfg.name}-teacher", input_column=cfg.data.input_column, label_column=cfg.data.label_column,
        max_length=cfg.data.max_length, log=log, **spec.finetune.model_dump(exclude_unset=True),
    )
    return load_model(folder, task=spec.task), str(folder)


def build_student(spec: SourceModelConfig, teacher: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    derived = spec.from_teacher
    if derived is not None and derived.budget is not None:
        return factorize(teacher, derived.budget, copy_weights=derived.copy_weights, seed=seed)[0].train()
    if derived is not None:
        assert derived.keep_layers is not None
        return derive_student(
            teacher, keep_layers=derived.keep_layers, copy_weights=derived.copy_weights, seed=seed
        ).train()
    assert spec.source is not None
    return load_model(spec.source, task=spec.task, num_labels=spec.num_labels, kwargs=spec.kwargs)


def run_any_model(
    cfg: AnyModelRunConfig, *, resume: bool = False, run_dir: str | Path | None = None, log: Log = print
) -> Path:
    """Fine-tune/load the teacher, train every student on the same budget, evaluate, report."""
    if resume:
        log("kdkit: resume is not supported for source-named classifier runs yet; starting a new run")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run_dir = resolve_run_dir(cfg.output_dir, cfg.name, resume=False, run_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dumped = cfg.model_dump(mode="json")
    (run_dir / "config.json").write_text(json.dumps(dumped, indent=2) + "\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dumped, sort_keys=False))
    log(f"kdkit: run folder {run_dir}")

    train_data = load_split(cfg.data, "train")
    eval_data = load_split(cfg.data, "eval") if cfg.data.eval is not None else None
    teacher, tokenizer_source = build_teacher(cfg, train_data, eval_data, log)
    tokenizer = _tokenizer(cfg.data.tokenizer or tokenizer_source)
    options: dict[str, Any] = {
        "input_column": cfg.data.input_column, "label_column": cfg.data.label_column, "tokenizer": tokenizer,
        "max_length": cfg.data.max_length,
        "image_transform": default_image_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std),
    }
    train_set = as_examples(train_data, **options)
    eval_set = as_examples(eval_data, **options) if eval_data is not None else None
    if eval_set is not None and cfg.eval.subset is not None and cfg.eval.subset < len(eval_set):
        eval_set = eval_set.take(range(cfg.eval.subset))
    t_adapter = LogitsAdapter(teacher).eval()
    check_models_and_data(None, t_adapter, train_set, "data.train", student_role="teacher")
    # once, shared by every KD student; methods with their own distiller (makd) run the teacher live
    if any(not getattr(run.method_class(), "own_distiller", False) for run in cfg.students):
        train_set.teacher_logits = predict(t_adapter, train_set)
        log(f"kdkit: teacher logits of {len(train_set):,} training examples cached")

    models: dict[str, nn.Module] = {"teacher": teacher}
    methods = {"teacher": "teacher"}
    histories: dict[str, Path] = {}
    train_times: dict[str, float] = {}
    for run in cfg.students:
        student = build_student(run.model or cfg.student, teacher, cfg.train.seed)
        result = distill(
            teacher=teacher, student=student, data=train_set, method=run.method,
            method_params=dict(run.model_extra or {}),
            objectives=[o.model_dump(exclude_unset=True) for o in run.objectives] or None,
            tokenizer=tokenizer,
            run_dir=run_dir, student_name=run.name, report=False, log=log, **cfg.train.model_dump(),
        )
        models[run.name] = result.student
        methods[run.name] = run.describe_method()
        histories[run.name] = run_dir / "students" / run.name / "metrics.jsonl"
        train_times[run.name] = result.train_time_s
    if eval_set is not None:
        _evaluate_examples(
            models, eval_set, run_dir, reference="teacher", methods=methods, histories=histories,
            train_times=train_times, config=dumped, latency_repeats=cfg.eval.latency_repeats,
            title=f"Classifier distillation: {cfg.name}", log=log,
        )
    return run_dir


def evaluate_any_model_run(run_dir: str | Path, *, log: Log = print) -> Path:
    """Re-evaluate a finished source-named run folder (`kdkit eval`): the teacher (from its source
    or the fine-tuning cache) and every saved student on data.eval; rewrites the report."""
    run_dir = Path(run_dir)
    cfg = AnyModelRunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    if cfg.data.eval is None:
        raise ValueError(f"{run_dir}: the run has no data.eval to evaluate on")
    train_data = load_split(cfg.data, "train") if cfg.teacher.finetune is not None else None
    teacher, tokenizer_source = build_teacher(cfg, train_data, None, log)
    tokenizer = _tokenizer(cfg.data.tokenizer or tokenizer_source)
    eval_set = as_examples(
        load_split(cfg.data, "eval"), input_column=cfg.data.input_column, label_column=cfg.data.label_column,
        tokenizer=tokenizer, max_length=cfg.data.max_length,
        image_transform=default_image_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std),
    )
    if cfg.eval.subset is not None and cfg.eval.subset < len(eval_set):
        eval_set = eval_set.take(range(cfg.eval.subset))
    models: dict[str, nn.Module] = {"teacher": teacher}
    methods = {"teacher": "teacher"}
    histories: dict[str, Path] = {}
    for run in cfg.students:
        out = run_dir / "students" / run.name
        spec = run.model or cfg.student
        if (out / "model" / LOWRANK_FILE).is_file():  # a factorised student (save_student's layout)
            models[run.name] = load_student(out / "model")
        elif (out / "model" / "config.json").is_file():
            models[run.name] = load_model(out / "model", task=spec.task)
        elif (out / "model.safetensors").is_file():
            from safetensors.torch import load_file

            student = build_student(spec, teacher, cfg.train.seed)
            student.load_state_dict(load_file(str(out / "model.safetensors")))
            models[run.name] = student
        else:
            log(f"kdkit: student {run.name} has no saved model; left out of the report")
            continue
        methods[run.name] = run.describe_method()
        histories[run.name] = out / "metrics.jsonl"
    _evaluate_examples(
        models, eval_set, run_dir, reference="teacher", methods=methods, histories=histories,
        config=cfg.model_dump(mode="json"), latency_repeats=cfg.eval.latency_repeats,
        title=f"Classifier distillation: {cfg.name}", log=log,
    )
    return run_dir


def _tokenizer(source: str | None) -> Any:
    if source is None:
        return None
    try:
        return load_tokenizer(source)
    except (OSError, ValueError):
        return None


def train_examples(cfg: AnyModelRunConfig, tokenizer: Any) -> Examples:
    """The training split as Examples (for benchmarks that reuse a run's data)."""
    return as_examples(
        load_split(cfg.data, "train"), input_column=cfg.data.input_column,
        label_column=cfg.data.label_column, tokenizer=tokenizer, max_length=cfg.data.max_length,
    )


__all__ = [
    "build_student",
    "build_teacher",
    "evaluate_any_model_run",
    "load_split",
    "run_any_model",
    "train_examples",
]
