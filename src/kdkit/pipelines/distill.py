"""`kdkit.distill` and `kdkit.evaluate` (exported lazily by `kdkit`): your own teacher, student, data.

```python
import kdkit
result = kdkit.distill(teacher=t, student=s, data=(X, y), eval_data=(X_test, y_test),
                       method="kd", method_params={"temperature": 4.0},
                       steps=300, batch_size=32, lr=3e-3, output_dir="runs/mine")
result.student, result.metrics, result.run_dir
kdkit.evaluate({"teacher": t, "student": s}, (X_test, y_test), output_dir="runs/eval")
```

Models: any `nn.Module` mapping inputs to logits [B, C], a Hugging Face model object (its
`.logits` are used; dict inputs are passed as keywords), or a string loaded by
`kdkit.models.hf.load_model` (a Hugging Face id / folder with `task=`, `"pkg:<package>/<folder>"`,
`"timm:<name>"`, `"package.module:factory"`). Data: see `kdkit.data.examples` (tensors `(X, y)`,
`X` alone for label-free transfer, torch Datasets of pairs or dicts, `datasets.Dataset`; text is
tokenized with the teacher's tokenizer unless `tokenizer=` is given).

Before any training, kdkit checks and refuses with one line: unknown engine settings or
method parameters, data of different sizes, NaN/inf inputs, inputs the teacher or student cannot
run on, outputs that are not [B, C] logits, a student whose output width differs from the
teacher's, labels outside the teacher's classes, and label-only objectives on unlabelled data.

The run folder (`output_dir/name/<UTC stamp>`, or `run_dir=`) is laid out like the CLI's:
`students/<name>/` (engine history, checkpoints, the trained model), `distill.json` (settings),
`metrics.json`, `report.md`, `report.html`, `plots/`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import Tensor, nn

from kdkit.config.loading import ConfigError, validation_message
from kdkit.config.train import TrainConfig
from kdkit.data.examples import NO_LABEL, DataError, Examples, as_examples, collate
from kdkit.engine import train
from kdkit.eval import classifier_metrics, measure_latency, model_footprint
from kdkit.methods.any_model import (
    AnyModelDistiller,
    LogitsAdapter,
    drop_label_terms,
    resolve_objectives,
)
from kdkit.methods.base import classifier_method
from kdkit.models.builders import lowrank_layers, save_student
from kdkit.models.hf import load_model, load_tokenizer
from kdkit.pipelines.run_folder import resolve_run_dir
from kdkit.registry import OBJECTIVES, load_builtins
from kdkit.report import write_report
from kdkit.report.tables import CLASSIFIER_COLUMNS

logger = logging.getLogger(__name__)
Log = Callable[[str], None]



@dataclass
class DistillResult:
    """What `distill` returns. student: the trained module (the object passed in, trained in
    place, on the CPU); metrics: the student's evaluation (accuracy, agreement, kl_to_teacher, ece,
    nll, parameters, latency...) plus "teacher_accuracy", empty without eval_data; run_dir: the
    report folder; rows: every evaluated model's row; notes: what the log said about the data."""

    student: nn.Module
    metrics: dict[str, Any]
    run_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_time_s: float = 0.0
    teacher_cache_s: float | None = None


@dataclass
class EvaluationResult:
    """What `evaluate` returns: one row per model and the report folder."""

    rows: list[dict[str, Any]]
    run_dir: Path

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["model"] == name)


# ----------------------------------------------------------------------------------------------
# Models


def _as_model(model: Any, role: str, *, task: str | None, num_labels: int | None) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, task=task or "sequence-classification", num_labels=num_labels)
    raise TypeError(f"{role} must be a torch nn.Module, a Hugging Face model, or a model id/folder; "
                    f"got {type(model).__name__}")


def _tokenizer_of(source: Any) -> Any:
    """The tokenizer saved beside a model given by name or as an HF object (None if there is none)."""
    path = source if isinstance(source, (str, Path)) else getattr(source, "name_or_path", None)
    if not path:
        return None
    try:
        return load_tokenizer(path)
    except (OSError, ValueError):
        return None


def _train_config(settings: Mapping[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(dict(settings))
    except ValidationError as error:
        message = validation_message(error)
        if "unknown field" in message:
            known = ", ".join(TrainConfig.model_fields)
            message += f" (engine settings: {known})"
        raise ConfigError(message.replace("config error at", "setting")) from None


# ----------------------------------------------------------------------------------------------
# Checks before training


@torch.no_grad()
def _probe(model: nn.Module, inputs: Any, role: str, shape: str) -> Tensor:
    """Logits of `model` on a 2-example batch, or a DataError naming what went wrong."""
    was_training = model.training
    model.eval()
    try:
        logits = model(inputs)
    except Exception as error:  # noqa: BLE001 - any failure here is a mismatch the user must fix
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"the {role} cannot run on the data's inputs ({shape}): {first}") from error
    finally:
        model.train(was_training)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise DataError(
            f"the {role} must return logits [batch, classes]; on inputs {shape} it returned {got}"
        )
    return logits


def _shape(inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        return ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
    return str(list(inputs.shape))


def check_models_and_data(
    teacher: nn.Module | None, student: nn.Module, examples: Examples, role: str = "data",
    student_role: str = "student",
) -> int:
    """Run every pre-training check; returns the number of classes C."""
    examples.check_finite()
    probe = examples.batch(range(min(2, len(examples))))
    shape = _shape(probe)
    student_width = _probe(student, probe, student_role, shape).shape[1]
    classes = student_width
    if teacher is not None:
        teacher_width = _probe(teacher, probe, "teacher", shape).shape[1]
        if teacher_width != student_width:
            raise DataError(
                f"the student outputs {student_width} classes but the teacher {teacher_width}; "
                "give the student a head of the teacher's width"
            )
        classes = teacher_width
    labels = examples.labels[examples.labels != NO_LABEL]
    if labels.numel():
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            who = "teacher's" if teacher is not None else "student's"
            raise DataError(
                f"{role}: label {int(labels[bad][0])} is outside the {who} {classes} classes "
                f"(0..{classes - 1}); {int(bad.sum())} label(s) out of range"
            )
    return classes


@torch.no_grad()
def predict(model: nn.Module, examples: Examples, batch_size: int = 256) -> Tensor:
    """Logits [N, C] (float32, CPU) of an adapted model over the examples, in order, in eval mode."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunks = []
    try:
        for start in range(0, len(examples), batch_size):
            inputs = examples.batch(range(start, min(len(examples), start + batch_size)))
            if isinstance(inputs, dict):
                inputs = {k: v.to(device) for k, v in inputs.items()}
            else:
                inputs = inputs.to(device)
            chunks.append(model(inputs).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------
# The front door


def distill(
    teacher: Any = None,
    student: Any = None,
    data: Any = None,
    eval_data: Any = None,
    *,
    method: str | None = "kd",
    method_params: Mapping[str, Any] | None = None,
    objectives: Sequence[Mapping[str, Any]] | None = None,
    task: str | None = None,
    num_labels: int | None = None,
    tokenizer: Any = None,
    input_column: str | None = None,
    label_column: str | None = None,
    max_length: int = 128,
    cache_teacher: bool = True,
    output_dir: str | Path = "runs",
    name: str = "distill",
    run_dir: str | Path | None = None,
    student_name: str | None = None,
    latency_repeats: int = 20,
    report: bool = True,
    resume: bool = False,
    log: Log = print,
    **settings: Any,
) -> DistillResult:
    """Distil `teacher` into `student` on `data`; evaluate on `eval_data`; write the report.

    method / method_params: a classifier method of the registry ("kd", "dkd", "dist", "scratch",
    ...) and its typed parameters (e.g. {"temperature": 4.0, "alpha": 0.9}); `objectives` adds or
    overrides objective entries. task / num_labels: for models given by name. tokenizer: for text
    data (default: the teacher's, else the student's). input_column / label_column: for dict or
    `datasets` data. cache_teacher: compute the frozen teacher's logits once per training example
    and reuse them every epoch (not with feature objectives, which need live teacher features).
    resume: continue the student's training from its latest checkpoint in `run_dir` (a finished
    student is only re-evaluated). report: False skips the report (a pipeline comparing several
    students writes one at the end).
    settings: every engine setting of `TrainConfig` (steps, batch_size, lr, weight_decay,
    schedule, warmup_steps, seed, mixed_precision, ...). Returns a `DistillResult`.
    """
    load_builtins()
    cfg = _train_config(settings)
    # A method over per-layer transformer features (MaKD) builds its own distiller from its Params
    # instead of naming objective entries.
    own = classifier_method(method) if method is not None else None
    own_params = None
    if own is not None and own.own_distiller:
        if objectives:
            raise ValueError(
                f"method {method!r} builds its own distiller; objectives entries do not apply to it"
            )
        own_params = own.params(dict(method_params or {}))
        specs = []
    else:
        own = None
        specs = resolve_objectives(method, method_params, objectives)
    label = student_name or (method or "+".join(s.name for s in specs))
    if student is None:
        raise TypeError("distill needs a student (an nn.Module, a Hugging Face model, or a model id/folder)")
    if data is None:
        raise TypeError("distill needs data to train on")
    needs_teacher = (
        own_params.needs_teacher() if own_params is not None else any(_needs_teacher(s) for s in specs)
    )
    if needs_teacher and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher, but none was given")
    teacher_source, student_source = teacher, student
    teacher_model = (
        _as_model(teacher, "teacher", task=task, num_labels=num_labels) if teacher is not None else None
    )
    student_model = _as_model(student, "student", task=task, num_labels=num_labels)
    # checks and the engine put the teacher in eval mode and freeze it; it goes back as it came
    teacher_state = (
        (teacher_model.training, [p.requires_grad for p in teacher_model.parameters()])
        if teacher_model is not None else None
    )
    tokenizer = tokenizer or _tokenizer_of(teacher_source) or _tokenizer_of(student_source)
    options = {"input_column": input_column, "label_column": label_column, "tokenizer": tokenizer,
               "max_length": max_length}
    train_set = as_examples(data, **options)
    eval_set = as_examples(eval_data, **options) if eval_data is not None else None
    t_adapter = LogitsAdapter(teacher_model).eval() if teacher_model is not None else None
    s_adapter = LogitsAdapter(student_model)
    check_models_and_data(t_adapter, s_adapter, train_set, "data")
    if eval_set is not None:
        check_models_and_data(t_adapter, s_adapter, eval_set, "eval_data")
    if own_params is not None:
        notes = []
        if not train_set.has_labels and getattr(own_params, "ce_weight", 0) > 0:
            raise ValueError(
                f"method {method!r}: ce_weight > 0 needs labels, but the data has none (set ce_weight: 0)"
            )
    else:
        specs, notes = drop_label_terms(specs, train_set.has_labels)
    if train_set.has_labels and train_set.labelled < len(train_set):
        notes.append(
            f"{train_set.labelled:,} of {len(train_set):,} training examples are labelled; label terms "
            "are averaged over the labelled examples of each batch"
        )
    for note in notes:
        log(f"kdkit: {note}")

    distiller: Any
    if own is not None:  # its own batches: the student's and teacher's per-layer features, live
        distiller = own.distiller(own_params, student_model, teacher_model if needs_teacher else None)
        live_teacher = True
    else:
        distiller = AnyModelDistiller(
            s_adapter, t_adapter if needs_teacher else None, specs,
            train_set.batch(range(min(2, len(train_set)))),
        )
        live_teacher = bool(distiller.teacher_layers)  # feature objectives need the teacher's live features
    cache_s = None
    if train_set.teacher_logits is not None and needs_teacher and not live_teacher:
        log("kdkit: reusing the teacher logits already cached with the data")
    elif cache_teacher and needs_teacher and not live_teacher and t_adapter is not None:
        started = time.perf_counter()
        train_set.teacher_logits = predict(t_adapter, train_set)
        cache_s = time.perf_counter() - started
        log(f"kdkit: teacher logits of {len(train_set):,} training examples cached in {cache_s:.1f} s")

    run_dir = resolve_run_dir(output_dir, name, resume=False, run_dir=run_dir)
    out = run_dir / "students" / label
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "kind": "distill",
        "method": method,
        "objectives": [s.model_dump() for s in specs],
        "method_params": own_params.model_dump(mode="json") if own_params is not None else None,
        "train": cfg.model_dump(mode="json"),
        "teacher": _describe_model(teacher_source),
        "student": _describe_model(student_source),
        "train_examples": len(train_set),
        "labelled_examples": train_set.labelled,
        "eval_examples": len(eval_set) if eval_set is not None else 0,
        "cache_teacher": cache_s is not None,
        "notes": notes,
    }
    (out / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
    if report:
        (run_dir / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"kdkit: training {label} for {cfg.steps} steps of batch {cfg.batch_size}; run folder {run_dir}")
    try:
        result = train(
            distiller, train_set, cfg, out, collate_fn=lambda b: collate(b, train_set.pad_values),
            description=f"student {label}", resume=resume,
        )
    finally:
        if teacher_model is not None and teacher_state is not None:
            teacher_model.train(teacher_state[0])
            for parameter, flag in zip(teacher_model.parameters(), teacher_state[1]):
                parameter.requires_grad_(flag)
    trained = distiller.student
    student_model = (trained.model if isinstance(trained, LogitsAdapter) else trained).cpu()
    _save(student_model, out, tokenizer)
    trained_s = result.train_time_s  # over every session of this student, resumed ones too
    (out / "train.json").write_text(json.dumps(
        {"steps": result.steps, "wall_time_s": trained_s, "final_losses": result.final_losses,
         "teacher_cache_s": cache_s}, indent=2) + "\n")

    rows: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    if eval_set is not None and report:
        models = {"teacher": teacher_model} if teacher_model is not None else {}
        models[label] = student_model
        evaluation = _evaluate_examples(
            models, eval_set, run_dir, reference="teacher" if teacher_model is not None else None,
            methods={label: method or "objectives", "teacher": "teacher"},
            histories={label: out / "metrics.jsonl"},
            train_times={label: trained_s},
            notes=notes, config=record, latency_repeats=latency_repeats,
            title=f"Distillation: {label}", log=log,
        )
        rows = evaluation.rows
        metrics = dict(evaluation.row(label))
        if teacher_model is not None:
            metrics["teacher_accuracy"] = evaluation.row("teacher")["accuracy"]
    elif report:
        write_report(run_dir, title=f"Distillation: {label}", rows=[], columns=CLASSIFIER_COLUMNS,
                     histories={label: out / "metrics.jsonl"}, config=record, notes=notes, scatter=None)
    return DistillResult(student_model, metrics, run_dir, rows, notes, trained_s, cache_s)


def _needs_teacher(spec: Any) -> bool:
    return bool(OBJECTIVES.get(spec.name).needs_teacher)


def _describe_model(model: Any) -> dict[str, Any]:
    if isinstance(model, (str, Path)):
        return {"source": str(model)}
    if model is None:
        return {}
    info: dict[str, Any] = {"class": type(model).__name__}
    if getattr(model, "name_or_path", None):
        info["source"] = str(model.name_or_path)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return info


def _save(model: nn.Module, folder: Path, tokenizer: Any) -> None:
    """A Hugging Face model as a plain HF folder (folder/model), a factorised one as
    `save_student`'s folder (reloaded by `load_student`), else folder/model.safetensors."""
    if lowrank_layers(model):
        save_student(model, folder / "model", tokenizer)
        return
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder / "model")
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder / "model")
        return
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    partial = folder / "model.tmp"
    save_file(state, str(partial))
    partial.replace(folder / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# Evaluation of models trained anywhere


def evaluate(
    models: Mapping[str, Any] | Sequence[Any],
    data: Any,
    *,
    reference: str | None = "teacher",
    task: str | None = None,
    num_labels: int | None = None,
    tokenizer: Any = None,
    input_column: str | None = None,
    label_column: str | None = None,
    max_length: int = 128,
    output_dir: str | Path = "runs",
    name: str = "evaluate",
    run_dir: str | Path | None = None,
    latency_repeats: int = 20,
    title: str = "Model comparison",
    log: Log = print,
) -> EvaluationResult:
    """Compare classifiers on labelled `data`: accuracy, NLL, ECE, agreement and KL(p_ref ‖ p) with
    the reference model, parameters, size on disk, latency per example (batch 1, median). models:
    {name: model} or a list (named model0, model1, ...); the reference is the model named
    `reference` (default "teacher"), else the first. Writes the report folder; returns the rows."""
    named = dict(models) if isinstance(models, Mapping) else {f"model{i}": m for i, m in enumerate(models)}
    if not named:
        raise ValueError("evaluate needs at least one model")
    loaded = {n: _as_model(m, n, task=task, num_labels=num_labels) for n, m in named.items()}
    tokenizer = tokenizer or next((t for t in map(_tokenizer_of, named.values()) if t is not None), None)
    examples = as_examples(data, input_column=input_column, label_column=label_column,
                           tokenizer=tokenizer, max_length=max_length)
    if not examples.has_labels:
        raise DataError("evaluate needs labelled data (accuracy is measured against the labels)")
    ref = reference if reference in loaded else next(iter(loaded))
    adapters = {n: LogitsAdapter(m) for n, m in loaded.items()}
    for n, adapter in adapters.items():
        check_models_and_data(adapters[ref] if n != ref else None, adapter, examples)
    run_dir = resolve_run_dir(output_dir, name, resume=False, run_dir=run_dir)
    return _evaluate_examples(loaded, examples, run_dir, reference=ref, latency_repeats=latency_repeats,
                              title=title, log=log)


def _evaluate_examples(
    models: Mapping[str, nn.Module],
    examples: Examples,
    run_dir: Path,
    *,
    reference: str | None,
    methods: Mapping[str, str] | None = None,
    histories: Mapping[str, Path] | None = None,
    train_times: Mapping[str, float] | None = None,
    notes: Sequence[str] = (),
    config: dict[str, Any] | None = None,
    latency_repeats: int = 20,
    title: str,
    log: Log,
) -> EvaluationResult:
    labelled = examples.take((examples.labels != NO_LABEL).nonzero().flatten().tolist())
    adapters = {n: LogitsAdapter(m) for n, m in models.items()}
    logits = {n: predict(a, labelled) for n, a in adapters.items()}
    ref_logits = logits.get(reference) if reference else None
    one = labelled.batch([0])
    rows: list[dict[str, Any]] = []
    reliability: dict[str, Any] = {}
    for n, adapter in adapters.items():
        compare = ref_logits if (ref_logits is not None and n != reference) else None
        metrics = classifier_metrics(logits[n], labelled.labels, compare)
        reliability[n] = metrics.pop("reliability")
        if n == reference:
            metrics.update(agreement=1.0, kl_to_teacher=0.0)
        latency = measure_latency(adapter, one, repeats=latency_repeats)
        rows.append({
            "model": n,
            "method": (methods or {}).get(n, "given"),
            **metrics,
            **model_footprint(models[n]),
            "latency_ms_per_example": latency["latency_ms_per_example"],
            "latency_threads": latency["threads"],
            "train_time_s": (train_times or {}).get(n),
        })
    shown_notes = [
        f"Evaluated on {len(labelled):,} labelled examples; agreement and KL are measured against "
        f"{reference!r}." if reference else f"Evaluated on {len(labelled):,} labelled examples.",
        f"Latency: median of {latency_repeats} forward passes of one example on "
        f"{torch.get_num_threads()} CPU thread(s); compare latencies within one report only.",
        *notes,
    ]
    write_report(
        run_dir, title=title, rows=rows, columns=CLASSIFIER_COLUMNS,
        histories={k: v for k, v in (histories or {}).items() if Path(v).is_file()},
        reliability=reliability, config=config, notes=shown_notes, scatter=("parameters", "accuracy"),
    )
    for row in rows:
        agreement = f"  agreement {row['agreement']:.2%}" if "agreement" in row else ""
        log(f"kdkit: {row['model']:<12} accuracy {row['accuracy']:.2%}{agreement}  "
            f"parameters {row['parameters']:,}")
    log(f"kdkit: report written to {run_dir / 'report.html'}")
    return EvaluationResult(rows, run_dir)


__all__ = ["DistillResult", "EvaluationResult", "check_models_and_data", "distill", "evaluate", "predict"]
