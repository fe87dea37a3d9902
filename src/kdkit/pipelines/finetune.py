"""Fine-tune a teacher once and cache it: any model source + any labelled data → an HF folder.

`finetuned_teacher(source, data, ...)` returns the folder of a model fine-tuned with cross-entropy
(through `kdkit.distill` with method "scratch", so the engine, checks and report are the usual
ones). The folder lives under `cache_dir("teachers", finetuned-<key>)`, where the key hashes the
model source, task, number of labels, engine settings, max_length and the *content* of the training
data (texts/inputs and labels, not where they were read from): a CSV export of a dataset and the
dataset itself share one cached teacher. A later call with the same key only loads it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kdkit.paths import cache_dir

# TrainConfig fields that change how a run is watched, not what it learns
_NOT_LEARNING = {"progress", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers"}


def data_fingerprint(data: Any, input_column: str | None = None, label_column: str | None = None) -> str:
    """sha256 (16 hex digits) of a dataset's content: the input and label columns of a
    `datasets.Dataset` (or all columns), or the tensors of an `(X, y)` pair."""
    digest = hashlib.sha256()
    if hasattr(data, "column_names"):
        columns = [c for c in (input_column, label_column) if c] or list(data.column_names)
        for column in columns:
            digest.update(column.encode())
            digest.update(json.dumps(list(data[column]), default=str).encode())
    elif isinstance(data, tuple):
        for part in data:
            tensor = torch.as_tensor(part).contiguous()
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.numpy().tobytes())
    else:
        raise TypeError(f"cannot fingerprint data of type {type(data).__name__}")
    return digest.hexdigest()[:16]


def teacher_key(source: str, *, task: str, num_labels: int, settings: Mapping[str, Any], max_length: int,
                fingerprint: str) -> str:
    from kdkit.config.train import TrainConfig

    train = TrainConfig.model_validate(dict(settings)).model_dump(mode="json", exclude=_NOT_LEARNING)
    blob = json.dumps({"source": source, "task": task, "num_labels": num_labels, "train": train,
                       "max_length": max_length, "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finetuned_teacher(
    source: str,
    data: Any,
    *,
    task: str = "sequence-classification",
    num_labels: int,
    eval_data: Any = None,
    name: str = "teacher",
    input_column: str | None = None,
    label_column: str | None = None,
    max_length: int = 128,
    log: Callable[[str], None] = print,
    **settings: Any,
) -> Path:
    """The cached folder of `source` fine-tuned on `data` (trained now on a cache miss).

    settings: engine settings (steps, batch_size, lr, ...). The folder holds the HF model and its
    tokenizer (loadable with `kdkit.models.hf.load_model(folder, task=task)`) and teacher.json
    (settings, evaluation on `eval_data` if given, training wall time).
    """
    from kdkit.models.hf import load_model
    from kdkit.pipelines.distill import distill

    key = teacher_key(str(source), task=task, num_labels=num_labels, settings=settings,
                      max_length=max_length, fingerprint=data_fingerprint(data, input_column, label_column))
    folder = cache_dir("teachers", f"finetuned-{key}")  # `name` is for display only
    model_dir = folder / "model"
    if (folder / "teacher.json").is_file() and (model_dir / "config.json").is_file():
        info = json.loads((folder / "teacher.json").read_text())
        accuracy = info.get("metrics", {}).get("accuracy")
        shown = f" (accuracy {accuracy:.2%} on its eval data)" if accuracy is not None else ""
        log(f"kdkit: fine-tuned teacher loaded from cache {folder}{shown}")
        return model_dir
    log(f"kdkit: fine-tuning {source} on {len(data):,} examples; it will be cached in {folder}")
    model = load_model(source, task=task, num_labels=num_labels)
    if folder.exists():  # a killed earlier attempt: start clean (teacher training is not resumable here)
        shutil.rmtree(folder)
    result = distill(
        teacher=None, student=model, data=data, eval_data=eval_data, method="scratch",
        input_column=input_column, label_column=label_column, max_length=max_length,
        run_dir=folder / "run", student_name=name, log=log, **settings,
    )
    run_model = folder / "run" / "students" / name / "model"
    run_model.rename(model_dir)
    shutil.rmtree(folder / "run" / "students" / name / "checkpoints", ignore_errors=True)
    info = {
        "source": str(source), "task": task, "num_labels": num_labels, "max_length": max_length,
        "train": dict(settings), "train_examples": len(data), "wall_time_s": result.train_time_s,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / "teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    accuracy = result.metrics.get("accuracy")
    shown = f", accuracy {accuracy:.2%}" if accuracy is not None else ""
    log(f"kdkit: teacher fine-tuned in {result.train_time_s:.0f} s{shown}")
    return model_dir


__all__ = ["data_fingerprint", "finetuned_teacher", "teacher_key"]
