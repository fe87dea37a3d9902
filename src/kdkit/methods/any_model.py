"""Classifier distillation of any model on any data: adapters over the classifier objectives.

- `LogitsAdapter` calls a model the way its inputs need (a tensor positionally, a dict of token
  tensors as keywords) and returns plain logits [B, C] (HF outputs' `.logits` taken out).
- Labels are optional: every objective declares `label_use` — "required" (ce, dkd: nothing to
  train on without labels), "optional" (kd: its label term is dropped when a batch has no labels,
  leaving the soft targets alone) or "unused" (dist, fitnet, at). Labels equal to `NO_LABEL`
  (-100) mark unlabelled examples, so one batch may mix labelled and unlabelled ones.
- `AnyModelDistiller` runs those objectives, reading the teacher's logits from the batch when
  they were cached ("teacher_logits") instead of running the teacher again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.data.examples import NO_LABEL
from kdkit.engine.distiller import Distiller
from kdkit.eval.classifier import _as_logits
from kdkit.methods.classifier import (
    ClassifierDistiller,
    ObjectiveSpec,
    Outputs,
    build_objective,
    classifier_recipe,
)
from kdkit.methods.hooks import FeatureHooks
from kdkit.registry import OBJECTIVES

LabelUse = Literal["required", "optional", "unused"]
# Declarations of the built-in objectives (an objective class may also set `label_use` itself).
LABEL_USE: dict[str, LabelUse] = {
    "ce": "required",
    "kd": "optional",
    "dkd": "required",
    "dist": "unused",
    "fitnet": "unused",
    "at": "unused",
}


def label_use(name: str) -> LabelUse:
    """How objective `name` uses labels; unknown objectives are assumed to require them."""
    name = OBJECTIVES.canonical(name)
    declared = getattr(OBJECTIVES.get(name), "label_use", None)
    return declared or LABEL_USE.get(name, "required")


def soft_only(spec: ObjectiveSpec) -> ObjectiveSpec | None:
    """The label-free version of a label-optional entry (kd: α = 1, pure soft targets)."""
    if spec.name == "kd":
        return ObjectiveSpec.model_validate({**spec.model_dump(), "alpha": 1.0})
    return None


def resolve_objectives(
    method: str | None,
    method_params: Mapping[str, Any] | None = None,
    objectives: Sequence[Mapping[str, Any]] | None = None,
) -> list[ObjectiveSpec]:
    """The objective entries of a classifier method, with `method_params` applied to every entry
    whose params define that field (an unknown field is an error), plus explicit `objectives`."""
    entries: list[dict[str, Any]] = []
    if method is not None:
        entries = classifier_recipe(method).expand(list(objectives or []))
    elif objectives:
        entries = [dict(o) for o in objectives]
    else:
        raise ValueError("name a method (e.g. method='kd') or a list of objectives")
    for key, value in (method_params or {}).items():
        hits = [e for e in entries if key in _fields(e["name"]) or key == "weight"]
        if not hits:
            names = sorted({f for e in entries for f in _fields(e["name"])})
            raise ValueError(
                f"method {method!r} has no parameter {key!r} (its parameters: {', '.join(names) or 'none'})"
            )
        for entry in hits:
            entry[key] = value
    return [ObjectiveSpec.model_validate(e) for e in entries]


def _fields(objective: str) -> list[str]:
    return list(OBJECTIVES.get(OBJECTIVES.canonical(objective)).Params.model_fields)


def check_label_use(specs: Sequence[ObjectiveSpec], has_labels: bool) -> list[str]:
    """Refuse label-only objectives on unlabelled data; returns notes for the log and report."""
    if has_labels:
        return []
    required = [s.name for s in specs if label_use(s.name) == "required"]
    if required:
        raise ValueError(
            f"objective {required[0]!r} needs labels, but the data has none; use a soft-target "
            "method (e.g. method='kd') for label-free transfer data, or give labels"
        )
    notes = []
    for spec in specs:
        if label_use(spec.name) == "optional":
            notes.append(
                f"the data has no labels: {spec.name} trains on the teacher's soft targets alone "
                "(its label term is dropped)"
            )
    return notes


class LogitsAdapter(nn.Module):
    """`model` as a function of one input (tensor or dict of tensors) returning logits [B, C]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any = None, **kwargs: Any) -> Tensor:
        if inputs is None:
            inputs = kwargs
        output = self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)
        return _as_logits(output)


class AnyModelDistiller(ClassifierDistiller):
    """ClassifierDistiller over adapted models, with labels optional and cached teacher logits.

    batch: {"inputs": Tensor or dict, "labels": [B] (NO_LABEL = none), "teacher_logits": [B, C]
    (optional)}. Label-required terms are averaged over the labelled examples of the batch (and
    skipped in a batch that has none); label-optional terms use their soft-only version on a batch
    without labels. Returns the weighted terms plus "_labelled" (the labelled fraction).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        objectives: Sequence[ObjectiveSpec],
        example_inputs: Any = None,
    ) -> None:
        super().__init__(student, teacher, objectives, example_inputs)
        self.specs = list(objectives)
        self.label_uses = [label_use(s.name) for s in self.specs]
        free = [soft_only(s) if use == "optional" else None for s, use in zip(self.specs, self.label_uses)]
        self.soft_terms = nn.ModuleList(
            build_objective(s) if s is not None else nn.Identity() for s in free
        )

    @torch.no_grad()
    def _feature_shapes(self, example_inputs: Any):  # noqa: ANN202 - FeatureShapes
        from kdkit.methods.classifier import FeatureShapes

        student, teacher = self.student, self.teacher
        was_training = student.training
        student.eval()
        try:
            with FeatureHooks(student, self.student_layers) as hooks:
                student(example_inputs)
                s_shapes = {n: tuple(hooks.get(n).shape[1:]) for n in self.student_layers}
        finally:
            student.train(was_training)
        t_shapes: dict[str, tuple[int, ...]] = {}
        if teacher is not None and self.teacher_layers:
            with FeatureHooks(teacher, self.teacher_layers) as hooks:
                teacher(example_inputs)
                t_shapes = {n: tuple(hooks.get(n).shape[1:]) for n in self.teacher_layers}
        return FeatureShapes(s_shapes, t_shapes)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        inputs, labels = batch["inputs"], batch["labels"]
        labelled = labels != NO_LABEL
        out = Outputs(student_logits=labels.new_zeros((), dtype=torch.float32), labels=labels)
        if self.uses_teacher:
            cached = batch.get("teacher_logits")
            if cached is not None and not self.teacher_layers:
                out.teacher_logits = cached.float()
            else:
                teacher = self.teacher
                assert teacher is not None
                with torch.no_grad(), FeatureHooks(teacher, self.teacher_layers) as hooks:
                    out.teacher_logits = teacher(inputs)
                    out.teacher_features = dict(hooks.features)
        with FeatureHooks(self.student, self.student_layers) as hooks:
            out.student_logits = self.student(inputs)
            out.student_features = dict(hooks.features)
        any_label = bool(labelled.any())
        losses: dict[str, Tensor] = {}
        for weight, term, soft, use in zip(self.weights, self.terms, self.soft_terms, self.label_uses):
            if use == "required" and not any_label:
                # same keys as a labelled batch, value 0 and no gradient: nothing to learn from here
                placeholder = _labelled_only(out, torch.ones_like(labelled))
                placeholder.labels = torch.zeros_like(labels)
                terms = {name: 0.0 * value for name, value in term.terms(placeholder).items()}
            elif use == "optional" and not any_label:
                terms = soft.terms(out)
            elif use == "required" and not bool(labelled.all()):
                terms = term.terms(_labelled_only(out, labelled))
            else:
                terms = term.terms(out)
            for key, value in terms.items():
                name, index = key, 2
                while name in losses:
                    name, index = f"{key}_{index}", index + 1
                losses[name] = weight * value
        losses["_labelled"] = labelled.float().mean().detach()
        return losses


def _labelled_only(out: Outputs, keep: Tensor) -> Outputs:
    """The batch restricted to its labelled examples (for label-required terms)."""
    return Outputs(
        student_logits=out.student_logits[keep],
        labels=out.labels[keep],
        teacher_logits=out.teacher_logits[keep] if out.teacher_logits is not None else None,
        student_features={k: v[keep] for k, v in out.student_features.items()},
        teacher_features={k: v[keep] for k, v in out.teacher_features.items()},
    )


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled examples (labels != NO_LABEL); 0 if there are none."""
    keep = labels != NO_LABEL
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep], labels[keep])


__all__ = [
    "LABEL_USE",
    "AnyModelDistiller",
    "Distiller",
    "LogitsAdapter",
    "check_label_use",
    "label_use",
    "masked_cross_entropy",
    "resolve_objectives",
    "soft_only",
]
