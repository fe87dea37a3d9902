"""The classifier distiller: the student and its weighted objective terms, the teacher beside them.

forward(batch) with batch = {"inputs": [B, ...], "labels": [B] (optional)} runs the teacher once
under no_grad (or reads its logits from the batch's "teacher_logits" [B, C] when they were cached
and no objective needs teacher features) and the student once, with forward hooks on the modules
the terms name, and returns every term already multiplied by its entry's weight (scalars, nats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdkit.engine.distiller import Distiller
from kdkit.models.hooks import FeatureHooks
from kdkit.objectives.classifier import FeatureShapes, ObjectiveSpec, Outputs, build_objective


class ClassifierDistiller(Distiller):
    """Student + objective terms (+ their projectors); the frozen teacher stays outside the tree.

    forward(batch) with batch = {"inputs": [B, ...], "labels": [B]} runs the teacher once under
    no_grad and the student once, with forward hooks on the modules the terms name, and returns
    every term already multiplied by its entry's weight, e.g. {"kd": …, "kd_ce": …} (scalars).
    A name used twice gets a suffix ("at", "at_2").
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        objectives: Sequence[ObjectiveSpec | Mapping[str, Any]],
        example_inputs: Tensor | None = None,
    ) -> None:
        super().__init__(student, teacher)
        specs = [o if isinstance(o, ObjectiveSpec) else ObjectiveSpec.model_validate(o) for o in objectives]
        if not specs:
            raise ValueError("a classifier distiller needs at least one objective")
        self.weights = [spec.weight for spec in specs]
        self.terms = nn.ModuleList(build_objective(spec) for spec in specs)
        needing = [spec.name for spec, term in zip(specs, self.terms) if term.needs_teacher]
        if needing and teacher is None:
            raise ValueError(f"objective {needing[0]!r} needs a teacher, but none was given")
        self.student_layers = list(dict.fromkeys(n for t in self.terms for n in t.student_layers()))
        self.teacher_layers = list(dict.fromkeys(n for t in self.terms for n in t.teacher_layers()))
        self.uses_teacher = bool(needing)
        if self.student_layers or self.teacher_layers:
            if example_inputs is None:
                raise ValueError(
                    "feature objectives need example_inputs (one small batch) to size projectors"
                )
            shapes = self._feature_shapes(example_inputs)
            for term in self.terms:
                term.build(shapes)

    @torch.no_grad()
    def _feature_shapes(self, example_inputs: Any) -> FeatureShapes:
        # Eval mode: a probe pass must not update BatchNorm running statistics.
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
                if isinstance(example_inputs, Tensor):  # dict inputs (tokenized text) stay where they are
                    example_inputs = example_inputs.to(next(teacher.parameters()).device)
                teacher(example_inputs)
                t_shapes = {n: tuple(hooks.get(n).shape[1:]) for n in self.teacher_layers}
        return FeatureShapes(s_shapes, t_shapes)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        inputs, labels = batch["inputs"], batch.get("labels")
        out = Outputs(student_logits=inputs.new_zeros(()), labels=labels, step=self.global_step)
        cached = batch.get("teacher_logits")  # stored once per input (kdkit.cache.classifier)
        if self.uses_teacher and cached is not None and not self.teacher_layers:
            out.teacher_logits = cached
        elif self.uses_teacher:
            teacher = self.teacher
            assert teacher is not None
            with torch.no_grad(), FeatureHooks(teacher, self.teacher_layers) as hooks:
                out.teacher_logits = teacher(inputs)
                out.teacher_features = dict(hooks.features)
        with FeatureHooks(self.student, self.student_layers) as hooks:
            out.student_logits = self.student(inputs)
            out.student_features = dict(hooks.features)
        losses: dict[str, Tensor] = {}
        for weight, term in zip(self.weights, self.terms):
            for key, value in term.terms(out).items():
                name, index = key, 2
                while name in losses:
                    name, index = f"{key}_{index}", index + 1
                losses[name] = weight * value
        return losses


__all__ = ["ClassifierDistiller"]
