"""The run config of `kind: classifier`: one teacher, one shared student architecture, several
students each trained with a method and/or explicit objectives on the same budget.

```yaml
kind: classifier
name: fashion-mnist-demo
data: {dataset: fashion-mnist, train_subset: null}
teacher: {arch: cnn, params: {width: 32}, train: {steps: 1500, lr: 0.003}}
student: {arch: cnn, params: {width: 4}}
students:
  - {name: scratch, method: scratch}
  - {name: kd, method: kd, temperature: 2, alpha: 0.5}   # the method's parameters, flat
train: {steps: 800, batch_size: 128, lr: 0.005}
```
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from kdkit.config.students import StudentRun, unique_student_names
from kdkit.engine.settings import TrainConfig
from kdkit.models.vision import VISION_MODELS, check_vision_params
from kdkit.registry import OBJECTIVES
from kdkit.settings import StrictModel
from kdkit.specs import ObjectiveSpec

# TrainConfig fields that change how a run is watched or stored, not what it learns: left out of
# the teacher's cache key so changing them reuses a cached teacher.
_NOT_LEARNING = {"progress", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers"}


class ClassifierDataConfig(StrictModel):
    """Which data; `val_size` holds out that many training examples (never trained on) and
    `eval_split: val` evaluates on them instead of the test set."""

    dataset: Literal["fashion-mnist"] = "fashion-mnist"
    root: str | None = None  # a folder with the IDX files; default: the documented search order
    val_size: int = Field(0, ge=0)
    train_subset: PositiveInt | None = None  # a deterministic sample of the training split
    eval_split: Literal["test", "val"] = "test"
    eval_subset: PositiveInt | None = None
    # Label-scarce runs: keep the labels of only this many training images (a draw seeded by
    # labelled_seed); the rest are an unlabelled transfer set. Students whose method needs labels
    # throughout (scratch, dkd) train on the labelled images alone; soft-target methods (kd, dist)
    # train on every image, their label terms on the labelled ones. The teacher is unaffected.
    labelled: PositiveInt | None = None
    labelled_seed: int = 0

    @model_validator(mode="after")
    def _val_needs_size(self) -> ClassifierDataConfig:
        if self.eval_split == "val" and self.val_size == 0:
            raise ValueError("eval_split 'val' needs val_size > 0")
        return self


class ModelConfig(StrictModel):
    """An architecture from `kdkit.models.vision.VISION_MODELS` and its keyword parameters."""

    arch: str = "cnn"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return VISION_MODELS.canonical(value)

    @model_validator(mode="after")
    def _known_params(self) -> ModelConfig:
        check_vision_params(self.arch, self.params)
        return self


class ClassifierTeacherConfig(ModelConfig):
    """The teacher: loaded from `checkpoint` (a safetensors state dict of `arch(params)`), or
    trained with `train` on the training split and cached under `cache_dir("teachers")`.
    cache_logits: compute the teacher's logits of the training inputs once and store them
    (`kdkit.cache.classifier`, keyed by the teacher's weights and the inputs), so students whose
    objectives need only the teacher's logits do not run it every batch; the inputs must repeat
    exactly every epoch (no random augmentation), as kdkit's datasets do."""

    checkpoint: str | None = None
    cache_logits: bool = True
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=1500, batch_size=128, lr=3e-3, weight_decay=5e-4)
    )


class ClassifierStudentRun(StudentRun):
    """One classifier student: a method with its parameters, explicit objective entries, or a method
    whose entries are updated by objectives of the same name (other objectives are appended)."""

    kind: ClassVar[str] = "classifier"

    objectives: list[ObjectiveSpec] = Field(default_factory=list)
    model: ModelConfig | None = None  # a different architecture for this student only

    @model_validator(mode="after")
    def _something_to_minimise(self) -> ClassifierStudentRun:
        if self.method is None and not self.objectives:
            raise ValueError(f"student {self.name!r} needs a method or a list of objectives")
        return self

    def resolved_objectives(self) -> list[ObjectiveSpec]:
        """The entries actually trained: the method's, updated/extended by `objectives`."""
        if self.method is None:
            return list(self.objectives)
        entries = self.method_class().objectives(self.method_params())
        for override in (spec.model_dump(exclude_unset=True) for spec in self.objectives):
            match = next((e for e in entries if e["name"] == override.get("name")), None)
            if match is None:
                entries.append(override)
            else:
                match.update(override)
        return [ObjectiveSpec.model_validate(entry) for entry in entries]

    def needs_teacher(self) -> bool:
        return any(OBJECTIVES.get(spec.name).needs_teacher for spec in self.resolved_objectives())

    def describe_method(self) -> str:
        return self.method or "+".join(o.name for o in self.objectives)


class ClassifierEvalConfig(StrictModel):
    batch_size: PositiveInt = 1000
    latency_batch_size: PositiveInt = 1  # latency is reported per example at this batch size
    latency_repeats: PositiveInt = 50
    reliability_bins: PositiveInt = 15


class ClassifierRunConfig(StrictModel):
    """A whole classifier distillation run; `kind` is the discriminator of kdkit's run configs."""

    kind: Literal["classifier"] = "classifier"
    name: str = Field("classifier", pattern=r"^[A-Za-z0-9_.-]+$")
    data: ClassifierDataConfig = Field(default_factory=ClassifierDataConfig)
    teacher: ClassifierTeacherConfig = Field(
        default_factory=lambda: ClassifierTeacherConfig(params={"width": 32})
    )
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(params={"width": 4}))
    students: list[ClassifierStudentRun] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)  # every student's budget
    eval: ClassifierEvalConfig = Field(default_factory=ClassifierEvalConfig)
    output_dir: str = "runs"
    # torch intra-op CPU threads; None keeps torch's default. On a CPU shared with other jobs one
    # thread per process is often faster than several that wait for each other.
    threads: PositiveInt | None = None

    _unique_names = field_validator("students")(unique_student_names)

    @model_validator(mode="after")
    def _tensor_methods(self) -> ClassifierRunConfig:
        for i, student in enumerate(self.students):
            method = student.method_class()
            if method is not None and getattr(method, "own_distiller", False):
                raise ValueError(
                    f"students[{i}] ({student.name}): method {student.method!r} needs Hugging Face "
                    "transformers' per-layer features; the arch: pipeline trains tensor-input models. "
                    "Name the teacher by teacher.source and the student by student.from_teacher or "
                    "student.source (see kdkit.config.any_model)"
                )
        return self

    def teacher_key(self) -> str:
        """A hash of everything the trained teacher depends on: arch, params, its training
        settings and the training data (not where the files live)."""
        train = self.teacher.train.model_dump(exclude=_NOT_LEARNING)
        data = self.data.model_dump(include={"dataset", "val_size", "train_subset"})
        blob = json.dumps(
            {"arch": self.teacher.arch, "params": self.teacher.params, "train": train, "data": data},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


__all__ = [
    "ClassifierDataConfig",
    "ClassifierEvalConfig",
    "ClassifierRunConfig",
    "ClassifierStudentRun",
    "ClassifierTeacherConfig",
    "ModelConfig",
]
