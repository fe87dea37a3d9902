"""Config options that name any model and any data (`kind: classifier` with generic sources).

```yaml
kind: classifier
name: my-model-on-my-csv
data: {train: data/train.csv, eval: data/test.csv, input_column: text, label_column: label}
teacher:
  source: my-org/my-bert     # HF id or folder | pkg:<package>/<folder> | timm:<name> | pkg.mod:factory
  task: sequence-classification
  num_labels: 2
  finetune: {steps: 300, lr: 1.0e-4}      # optional: fine-tune on data.train first (cached)
student:
  from_teacher: {keep_layers: [0, 5]}     # layer selection; {budget: 0.5} low-rank; or `source:`
students:
  - {name: scratch, method: scratch}
  - {name: kd, method: kd, temperature: 2.0}   # the method's parameters, flat
train: {steps: 300, batch_size: 32, lr: 1.0e-4}
```

A config is of this form when its teacher has `source:` (or its data has `train:`); the built-in
`arch:`/`dataset:` form is `kdkit.config.classifier`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from kdkit.config.classifier import ClassifierStudentRun
from kdkit.config.students import unique_student_names
from kdkit.config.train import StrictModel, TrainConfig
from kdkit.models.hf import TASKS, is_factory


class FilesDataConfig(StrictModel):
    """Local files through Hugging Face `datasets` (csv, json/jsonl, parquet, text, imagefolder)."""

    format: Literal["csv", "json", "parquet", "text", "imagefolder"] | None = None  # default: extension
    train: str | list[str]
    eval: str | list[str] | None = None
    input_column: str | None = None
    label_column: str | None = None  # None: "label"/"labels" if present, else label-free
    max_length: PositiveInt = 128  # tokens, for text
    tokenizer: str | None = None  # a model source whose tokenizer to use; default: the teacher's
    image_size: PositiveInt | None = None  # resize images to image_size × image_size
    mean: list[float] | None = None  # per-channel normalisation of images
    std: list[float] | None = None


class FromTeacher(StrictModel):
    """A student derived from the teacher (`kdkit.models.builders`): keep some transformer blocks
    (`keep_layers`, layer selection) or factorise every linear layer and embedding table by
    truncated SVD so the student has at most `budget` parameters (a fraction ≤ 1 of the teacher's,
    or a count). Neither: keep 2 layers. copy_weights: false gives the same shape freshly
    initialised (the from-scratch baseline of a fair comparison)."""

    keep_layers: list[int] | int | str | None = None
    budget: float | None = Field(None, gt=0)
    copy_weights: bool = True

    @model_validator(mode="after")
    def _one_way(self) -> FromTeacher:
        if self.keep_layers is not None and self.budget is not None:
            raise ValueError(
                "give keep_layers (layer selection) or budget (low-rank factorisation), not both"
            )
        if self.budget is None and self.keep_layers is None:
            self.keep_layers = 2
        return self


class SourceModelConfig(StrictModel):
    """A model by name: HF id / folder (with `task`), `pkg:<package>/<folder>`, `timm:<name>`, or
    `package.module:factory` (called with `kwargs`)."""

    source: str | None = None
    task: str = "sequence-classification"
    num_labels: PositiveInt | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    from_teacher: FromTeacher | None = None

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task {value!r} (known: {', '.join(TASKS)})")
        return value

    @field_validator("source")
    @classmethod
    def _resolvable(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.startswith("pkg:"):
            package = value[4:].partition("/")[0]
            if not package.isidentifier() or importlib.util.find_spec(package) is None:
                raise ValueError(f"{value}: the Python package {package!r} is not installed")
        elif value.startswith("timm:"):
            if importlib.util.find_spec("timm") is None:
                raise ValueError(f"{value}: timm is not installed (pip install timm)")
        elif is_factory(value) and not Path(value).exists():
            module = value.partition(":")[0]
            if importlib.util.find_spec(module.split(".")[0]) is None:
                raise ValueError(f"{value}: cannot import {module!r}")
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> SourceModelConfig:
        if (self.source is None) == (self.from_teacher is None):
            raise ValueError("give exactly one of source (a model by name) or from_teacher (layer selection)")
        return self


class SourceTeacherConfig(SourceModelConfig):
    """The teacher; with `finetune`, first fine-tuned on data.train with cross-entropy (cached)."""

    finetune: TrainConfig | None = None

    @model_validator(mode="after")
    def _teacher_has_source(self) -> SourceTeacherConfig:
        if self.from_teacher is not None:
            raise ValueError("the teacher needs a source (from_teacher is for students)")
        return self


class AnyStudentRun(ClassifierStudentRun):
    """One student, as in every classifier run (`{name, method, ...the method's parameters}`, or
    objective entries), optionally with its own model named by source."""

    model: SourceModelConfig | None = None  # type: ignore[assignment]


class AnyEvalConfig(StrictModel):
    latency_repeats: PositiveInt = 20
    subset: PositiveInt | None = None  # evaluate on the first `subset` eval examples only


class AnyModelRunConfig(StrictModel):
    """A classifier run over models and data named by source (see the module docstring)."""

    PIPELINE: ClassVar[str] = "kdkit.pipelines.any_model:run_any_model"  # what `kdkit run` calls

    kind: Literal["classifier"] = "classifier"
    name: str = Field("classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    data: FilesDataConfig
    teacher: SourceTeacherConfig
    student: SourceModelConfig
    students: list[AnyStudentRun] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: AnyEvalConfig = Field(default_factory=AnyEvalConfig)
    output_dir: str = "runs"
    threads: PositiveInt | None = None

    _unique_names = field_validator("students")(unique_student_names)


def is_any_model_config(data: dict[str, Any]) -> bool:
    """True when a `kind: classifier` mapping names its teacher or data by source/files."""
    teacher, data_section = data.get("teacher"), data.get("data")
    return (isinstance(teacher, dict) and "source" in teacher) or (
        isinstance(data_section, dict) and "train" in data_section
    )


__all__ = [
    "AnyModelRunConfig",
    "AnyStudentRun",
    "FilesDataConfig",
    "FromTeacher",
    "SourceModelConfig",
    "SourceTeacherConfig",
    "is_any_model_config",
]
