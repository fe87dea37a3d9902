"""Classifier distillation of any model on any data: adapters over the classifier objectives.

- `LogitsAdapter` calls a model the way its inputs need (a tensor positionally, a dict of token
  tensors as keywords) and returns plain logits [B, C] (HF outputs' `.logits` taken out).
- Labels are optional: each objective declares `needs_labels` (ce, dkd: True). On data without any
  label, a method's label-needing entries are dropped when others remain (kd = α·soft targets +
  (1−α)·ce trains on the soft targets alone) and refused when nothing would remain (scratch, dkd).
  Labels equal to `NO_LABEL` (-100) mark unlabelled examples, so one batch may mix both kinds:
  label-needing terms are then averaged over the batch's labelled examples only.
- `AnyModelDistiller` runs those objectives, reading the teacher's logits from the batch when they
  were cached ("teacher_logits") instead of running the teacher again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.data.examples import NO_LABEL
from kdkit.eval.classifier import _as_logits
from kdkit.methods.base import classifier_method
from kdkit.methods.classifier_distiller import ClassifierDistiller
from kdkit.models.hooks import FeatureHooks
from kdkit.objectives.classifier import ObjectiveSpec, Outputs
from kdkit.registry import OBJECTIVES


def needs_labels(name: str) -> bool:
    """Whether objective `name` cannot be computed without labels (its class declares it)."""
    return bool(getattr(OBJECTIVES.get(OBJECTIVES.canonical(name)), "needs_labels", True))


def resolve_objectives(
    method: str | None,
    method_params: Mapping[str, Any] | None = None,
    objectives: Sequence[Mapping[str, Any]] | None = None,
) -> list[ObjectiveSpec]:
    """The weighted objective entries of a classifier method with its (flat, typed) parameters,
    updated/extended by explicit `objectives` entries of the same name (others appended)."""
    if method is None:
        if not objectives:
            raise ValueError("name a method (e.g. method='kd') or a list of objectives")
        return [ObjectiveSpec.model_validate(dict(o)) for o in objectives]
    cls = classifier_method(method)
    known = list(cls.Params.model_fields)
    unknown = [key for key in (method_params or {}) if key not in known]
    if unknown:
        raise ValueError(
            f"method {method!r} has no parameter {unknown[0]!r} "
            f"(its parameters: {', '.join(sorted(known)) or 'none'})"
        )
    entries = cls.objectives(cls.params(dict(method_params or {})))
    for override in objectives or []:
        override = dict(override)
        match = next((e for e in entries if e["name"] == override.get("name")), None)
        if match is None:
            entries.append(override)
        else:
            match.update(override)
    return [ObjectiveSpec.model_validate(entry) for entry in entries]


def drop_label_terms(
    specs: Sequence[ObjectiveSpec], has_labels: bool
) -> tuple[list[ObjectiveSpec], list[str]]:
    """The entries to train on data with or without labels, and notes for the log and report.

    With labels: unchanged. Without: label-needing entries are dropped if others remain, else
    ValueError naming the objective that needs labels."""
    if has_labels:
        return list(specs), []
    kept = [s for s in specs if not needs_labels(s.name)]
    dropped = [s.name for s in specs if needs_labels(s.name)]
    if not kept:
        raise ValueError(
            f"objective {dropped[0]!r} needs labels, but the data has none; use a soft-target "
            "method (e.g. method='kd') for label-free transfer data, or give labels"
        )
    if not dropped:
        return kept, []
    soft = ", ".join(s.name for s in kept)
    return kept, [
        f"the data has no labels: training on the teacher's soft targets alone ({soft}); "
        f"the label term{'s' if len(dropped) > 1 else ''} {', '.join(dropped)} dropped"
    ]


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
    (optional)}. Label-needing terms are averaged over the labelled examples of the batch (0, with
    no gradient, in a batch that has none). Returns the weighted terms plus "_labelled" (the
    labelled fraction of the batch).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        objectives: Sequence[ObjectiveSpec],
        example_inputs: Any = None,
    ) -> None:
        super().__init__(student, teacher, objectives, example_inputs)
        self.label_terms = [bool(getattr(term, "needs_labels", True)) for term in self.terms]


    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        inputs, labels = batch["inputs"], batch["labels"]
        labelled = labels != NO_LABEL
        out = Outputs(student_logits=labels.new_zeros((), dtype=torch.float32), labels=labels,
                      step=int(getattr(self, "global_step", 0)))
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
        any_label, all_labels = bool(labelled.any()), bool(labelled.all())
        losses: dict[str, Tensor] = {}
        for weight, term, uses_labels in zip(self.weights, self.terms, self.label_terms):
            if uses_labels and not any_label:
                # same keys as a labelled batch, value 0 and no gradient: nothing to learn here
                placeholder = _labelled_only(out, torch.ones_like(labelled))
                placeholder.labels = torch.zeros_like(labels)
                terms = {name: 0.0 * value for name, value in term.terms(placeholder).items()}
            elif uses_labels and not all_labels:
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
    """The batch restricted to its labelled examples (for label-needing terms)."""
    return Outputs(
        student_logits=out.student_logits[keep],
        labels=out.labels[keep] if out.labels is not None else None,
        teacher_logits=out.teacher_logits[keep] if out.teacher_logits is not None else None,
        student_features={k: v[keep] for k, v in out.student_features.items()},
        teacher_features={k: v[keep] for k, v in out.teacher_features.items()},
        step=out.step,
    )


__all__ = [
    "AnyModelDistiller",
    "LogitsAdapter",
    "drop_label_terms",
    "needs_labels",
    "resolve_objectives",
]
