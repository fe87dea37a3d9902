"""Classifier distillation end to end: data → teacher (cached) → students → evaluation → report.

`run_classifier(cfg)` is what `kdkit run` / `kdkit demo` call for `kind: classifier`;
`evaluate_classifier_run(run_dir)` re-evaluates a finished run folder (`kdkit eval`).

Run folder layout:
    config.yaml                      the validated config
    teacher/model.safetensors        a copy of the teacher used (+ teacher.json)
    students/<name>/                 engine output (metrics.jsonl, checkpoints/), model.safetensors,
                                     objectives.json, train.json
    metrics.json, report.md, report.html, plots/    from `kdkit.report.write_report`
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdkit.config.classifier import ClassifierRunConfig, ClassifierStudentRun, ModelConfig
from kdkit.data.fashion_mnist import TensorClassificationDataset, load_fashion_mnist
from kdkit.engine import CrossEntropyDistiller, train
from kdkit.engine.checkpoint import latest_checkpoint
from kdkit.eval import classifier_metrics, measure_latency, model_footprint, predict_logits
from kdkit.methods.classifier_distiller import ClassifierDistiller
from kdkit.models.vision import build_vision_model
from kdkit.paths import cache_dir
from kdkit.pipelines.run_folder import read_json
from kdkit.pipelines.skeleton import run_students
from kdkit.report import classifier_results_table, write_report
from kdkit.report.tables import CLASSIFIER_COLUMNS

logger = logging.getLogger(__name__)
Log = Callable[[str], None]



class ClassifierRun:
    """The skeleton's adapter for `kind: classifier` (see `kdkit.pipelines.skeleton`)."""

    collate = None
    delete_checkpoints = False

    def __init__(self, cfg: ClassifierRunConfig, log: Log = print) -> None:
        self.cfg, self.log = cfg, log
        self.resume = False

    def prepare(self, run_dir: Path) -> None:
        self.train_set, self.eval_set = load_data(self.cfg)
        self.teacher = load_or_train_teacher(self.cfg, self.train_set, self.eval_set, log=self.log)
        _save_teacher_copy(self.cfg, self.teacher, run_dir)
        self.full_set = self.train_set
        if self.cfg.data.labelled is not None:
            from kdkit.pipelines.label_scarce import split_labels

            # a cached teacher was trained on exactly this training split: keep its logits beside it
            cached = self.cfg.teacher.checkpoint is None
            cache = teacher_cache_dir(self.cfg) / "train_logits.safetensors" if cached else None
            self.scarce = split_labels(self.full_set, self.teacher, self.cfg.data.labelled,
                                       self.cfg.data.labelled_seed, log=self.log, cache=cache)
        elif self.cfg.teacher.cache_logits and any(s.needs_teacher() for s in self.cfg.students):
            from kdkit.cache.classifier import WithTeacherLogits, cached_teacher_logits

            logits, info = cached_teacher_logits(
                self.teacher, self.train_set, batch_size=self.cfg.eval.batch_size, log=self.log
            )
            how = "read from" if info["hit"] else f"computed in {info['seconds']:.1f} s and stored in"
            self.log(f"kdkit: teacher logits of {len(logits):,} training inputs {how} {info['path']}")
            self.train_set = WithTeacherLogits(self.train_set, logits)

    def finished(self, out: Path) -> bool:
        return (out / "model.safetensors").is_file()

    def build_distiller(self, student_cfg: ClassifierStudentRun) -> nn.Module:
        objectives = student_cfg.resolved_objectives()
        student = build_student(self.cfg, student_cfg.model)
        teacher = self.teacher if student_cfg.needs_teacher() else None
        if self.cfg.data.labelled is not None:  # label-scarce: each student gets the data it can use
            self.train_set, distiller = self.scarce.distiller(student, teacher, objectives)
            return distiller
        return ClassifierDistiller(student, teacher, objectives, self.train_set.inputs[:2])

    def describe(self, student_cfg: ClassifierStudentRun) -> str:
        return ", ".join(_describe(o.model_dump()) for o in student_cfg.resolved_objectives())

    def save_student(self, distiller: nn.Module, student_cfg: ClassifierStudentRun, out: Path) -> None:
        _save_model(distiller.student.cpu(), out / "model.safetensors")
        objectives = [o.model_dump() for o in student_cfg.resolved_objectives()]
        (out / "objectives.json").write_text(json.dumps(objectives, indent=2) + "\n")

    def evaluate(self, run_dir: Path) -> Path:
        return evaluate_classifier_run(
            run_dir, cfg=self.cfg, teacher=self.teacher, eval_set=self.eval_set, log=self.log
        )


def run_classifier(
    cfg: ClassifierRunConfig, *, resume: bool = False, run_dir: str | Path | None = None, log: Log = print
) -> Path:
    """Train (or load) the teacher, train every student on the same budget, evaluate, report.

    run_dir: default `output_dir/name/<UTC stamp>`; with resume=True and no run_dir, the latest
    folder under `output_dir/name`. Returns the run folder.
    """
    return run_students(cfg, ClassifierRun(cfg, log), resume=resume, run_dir=run_dir, log=log)


def load_data(cfg: ClassifierRunConfig) -> tuple[TensorClassificationDataset, TensorClassificationDataset]:
    """(training split, evaluation split) as the config describes them."""
    data = cfg.data
    train_set = load_fashion_mnist("train", data.root, val_size=data.val_size, subset=data.train_subset)
    eval_set = load_fashion_mnist(data.eval_split, data.root, val_size=data.val_size, subset=data.eval_subset)
    return train_set, eval_set


def build_student(cfg: ClassifierRunConfig, override: ModelConfig | None = None) -> nn.Module:
    model = override or cfg.student
    return build_vision_model(model.arch, model.params)


def load_or_train_teacher(
    cfg: ClassifierRunConfig,
    train_set: TensorClassificationDataset,
    eval_set: TensorClassificationDataset,
    *,
    log: Log = print,
) -> nn.Module:
    """The teacher in eval mode: from `teacher.checkpoint`, else from the cache
    (`cache_dir("teachers", <dataset>-<arch>-<hash>)`), else trained with cross-entropy and cached.
    A teacher training that was killed resumes from its checkpoints on the next call."""
    spec = cfg.teacher
    teacher = build_vision_model(spec.arch, spec.params)
    if spec.checkpoint is not None:
        teacher.load_state_dict(load_file(spec.checkpoint))
        log(f"kdkit: teacher loaded from {spec.checkpoint}")
        return teacher.eval()
    folder = teacher_cache_dir(cfg)
    weights = folder / "model.safetensors"
    if weights.is_file():
        teacher.load_state_dict(load_file(str(weights)))
        info = (
            json.loads((folder / "teacher.json").read_text()) if (folder / "teacher.json").is_file() else {}
        )
        accuracy = info.get("metrics", {}).get("accuracy")
        shown = f" (accuracy {accuracy:.2%} on {info.get('eval_split')})" if accuracy is not None else ""
        log(f"kdkit: teacher loaded from cache {folder}{shown}")
        return teacher.eval()
    log(
        f"kdkit: training the teacher ({spec.arch} {spec.params}, {spec.train.steps} steps); "
        f"it will be cached in {folder}"
    )
    torch.manual_seed(spec.train.seed)
    teacher = build_vision_model(spec.arch, spec.params)
    distiller = CrossEntropyDistiller(teacher)
    # resume a killed teacher training; asking to resume when nothing was saved only logs a warning
    resume = latest_checkpoint(folder / "train") is not None
    result = train(distiller, train_set, spec.train, folder / "train", resume=resume, description="teacher")
    teacher = distiller.student.cpu().eval()
    logits = predict_logits(teacher, eval_set, batch_size=cfg.eval.batch_size)
    metrics = classifier_metrics(logits, eval_set.labels)
    _save_model(teacher, weights)
    (folder / "teacher.json").write_text(
        json.dumps(
            {
                "arch": spec.arch,
                "params": spec.params,
                "train": spec.train.model_dump(),
                "data": cfg.data.model_dump(),
                "eval_split": cfg.data.eval_split,
                "metrics": {k: v for k, v in metrics.items() if k != "reliability"},
                "wall_time_s": result.train_time_s,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n"
    )
    # The engine's checkpoints are only needed to resume a killed training; the weights suffice now.
    shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)
    log(f"kdkit: teacher trained in {result.train_time_s:.0f} s, accuracy {metrics['accuracy']:.2%}")
    return teacher


def teacher_cache_dir(cfg: ClassifierRunConfig) -> Path:
    return cache_dir("teachers", f"{cfg.data.dataset}-{cfg.teacher.arch}-{cfg.teacher_key()}")


def evaluate_classifier_run(
    run_dir: str | Path,
    *,
    cfg: ClassifierRunConfig | None = None,
    teacher: nn.Module | None = None,
    eval_set: TensorClassificationDataset | None = None,
    log: Log = print,
) -> Path:
    """Evaluate the teacher and every finished student of a run folder and (re)write its report.

    Reads config.json and the saved safetensors where `cfg`/`teacher` are not given. Per model:
    accuracy, NLL, ECE + reliability bins, agreement and mean KL(p_T ‖ p_S) to the teacher
    (nats), parameters, safetensors size (bytes), latency per example (median of
    `eval.latency_repeats` timed forwards at `eval.latency_batch_size`, ms). Returns the run
    folder; the rows are in its metrics.json.
    """
    run_dir = Path(run_dir)
    if cfg is None:
        cfg = ClassifierRunConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
    if eval_set is None:
        eval_set = load_data(cfg)[1]
    if teacher is None:
        teacher = build_vision_model(cfg.teacher.arch, cfg.teacher.params)
        teacher.load_state_dict(load_file(str(run_dir / "teacher" / "model.safetensors")))
    teacher.eval()
    labels = eval_set.labels
    latency_batch = eval_set.inputs[: cfg.eval.latency_batch_size]
    log(f"kdkit: evaluating on {len(eval_set)} {cfg.data.eval_split} examples")
    teacher_logits = predict_logits(teacher, eval_set, batch_size=cfg.eval.batch_size)
    models: list[tuple[str, str, nn.Module, Path | None]] = [("teacher", "teacher (CE)", teacher, None)]
    for student_cfg in cfg.students:
        weights = run_dir / "students" / student_cfg.name / "model.safetensors"
        if not weights.is_file():
            log(f"kdkit: student {student_cfg.name} has no saved model; left out of the report")
            continue
        student = build_student(cfg, student_cfg.model)
        student.load_state_dict(load_file(str(weights)))
        method = student_cfg.describe_method()
        models.append((student_cfg.name, method, student.eval(), weights.parent / "metrics.jsonl"))

    rows: list[dict[str, Any]] = []
    reliability: dict[str, dict] = {}
    histories: dict[str, Path] = {}
    for name, method, model, history in models:
        logits = (
            teacher_logits
            if model is teacher
            else predict_logits(model, eval_set, batch_size=cfg.eval.batch_size)
        )
        metrics = classifier_metrics(
            logits, labels, None if model is teacher else teacher_logits, n_bins=cfg.eval.reliability_bins
        )
        reliability[name] = metrics.pop("reliability")
        latency = measure_latency(model, latency_batch, repeats=cfg.eval.latency_repeats)
        train_info = (
            read_json(history.parent / "train.json")
            if history
            else read_json(run_dir / "teacher" / "teacher.json")
        )
        rows.append(
            {
                "model": name,
                "method": method,
                **metrics,
                **({"agreement": 1.0, "kl_to_teacher": 0.0} if model is teacher else {}),
                **model_footprint(model),
                "latency_ms_per_example": latency["latency_ms_per_example"],
                "latency_batch_size": latency["batch_size"],
                "latency_threads": latency["threads"],
                "train_time_s": train_info.get("wall_time_s"),
            }
        )
        if history is not None and history.is_file():
            histories[name] = history
    scarce = (
        [f"Label-scarce: students keep the labels of {cfg.data.labelled:,} training images only; methods "
         "that need labels in every term (scratch, dkd) train on those alone, soft-target methods (kd, "
         "dist) on every training image with the teacher's soft targets (labels where known). The "
         "teacher was trained with all labels."]
        if cfg.data.labelled is not None else []
    )
    notes = [
        *scarce,
        f"Evaluated on {len(eval_set)} examples of the {cfg.data.dataset} {cfg.data.eval_split} split.",
        f"Every student: {cfg.student.arch} {cfg.student.params}, {cfg.train.steps} steps of batch "
        f"{cfg.train.batch_size} (same seed, initial weights and data order).",
        f"Latency: median of {cfg.eval.latency_repeats} timed forward passes at batch size "
        f"{cfg.eval.latency_batch_size} on {torch.get_num_threads()} CPU threads, divided by the batch size; "
        "the machine may be shared, so compare latencies within one report only.",
        "The teacher's train time is that of its original (cached) training; see teacher/teacher.json.",
    ]
    write_report(
        run_dir,
        title=f"Classifier distillation: {cfg.name}",
        rows=rows,
        columns=CLASSIFIER_COLUMNS,
        histories=histories,
        reliability=reliability,
        config=cfg.model_dump(mode="json"),
        notes=notes,
        scatter=("parameters", "accuracy"),
    )
    log(classifier_results_table(rows))
    log(f"kdkit: report written to {run_dir / 'report.html'}")
    return run_dir


def _save_teacher_copy(cfg: ClassifierRunConfig, teacher: nn.Module, run_dir: Path) -> None:
    """Keep the teacher beside the students, so the run folder can be re-evaluated on its own."""
    folder = run_dir / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    _save_model(teacher, folder / "model.safetensors")
    cached = teacher_cache_dir(cfg) / "teacher.json" if cfg.teacher.checkpoint is None else None
    info = read_json(cached) if cached else {"checkpoint": cfg.teacher.checkpoint}
    (folder / "teacher.json").write_text(json.dumps(info, indent=2) + "\n")


def _save_model(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    partial = path.with_suffix(".tmp")
    save_file(state, str(partial))
    partial.replace(path)


def _describe(entry: dict[str, Any]) -> str:
    """"0.9·kd(temperature=1.0, divergence=jsd, beta=0.5)": a divergence's own parameters flat."""
    entry = {**entry, **entry.get("divergence_params", {})}
    params = ", ".join(
        f"{k}={v}" for k, v in entry.items() if k not in ("name", "weight", "divergence_params")
    )
    return f"{entry['weight']:g}·{entry['name']}" + (f"({params})" if params else "")


__all__ = ["ClassifierRun", "evaluate_classifier_run", "load_data", "load_or_train_teacher", "run_classifier"]
