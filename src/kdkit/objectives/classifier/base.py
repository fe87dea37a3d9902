"""What every classifier objective term shares: the batch's outputs, feature shapes, the base class,
and `build_objective` (a term from an `ObjectiveSpec`, one weighted entry as a config writes it).

An objective term is a small `nn.Module` registered in `OBJECTIVES` with a pydantic `Params` model
(so a YAML entry `{name: kd, weight: 0.9, temperature: 4}` is validated field by field). It receives
the student's and teacher's logits and hooked features of one batch and returns named *unweighted*
scalar terms; the distiller multiplies them by the entry's weight. Learnable parts (projectors)
are submodules of the term, hence trained and checkpointed with the student; the teacher never is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from kdkit.registry import OBJECTIVES
from kdkit.settings import NoParams, StrictModel
from kdkit.specs import ObjectiveSpec


@dataclass
class Outputs:
    """One batch through student and teacher. logits: [B, C]; labels: [B] int64 or None (an
    unlabelled transfer set); features: module name -> that module's output (e.g. [B, C, H, W]);
    teacher entries are None without a teacher. `step`: the 0-based optimizer step the engine
    announced (`Distiller.on_step`), None outside the engine (for schedules such as warm-ups)."""

    student_logits: Tensor
    labels: Tensor | None
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    step: int | None = None


@dataclass
class FeatureShapes:
    """Per-example output shapes of hooked modules (no batch dimension), to size projectors."""

    student: dict[str, tuple[int, ...]]
    teacher: dict[str, tuple[int, ...]]


class Objective(nn.Module):
    """Base of objective terms. Subclasses set `Params`, `needs_teacher`, `needs_labels`, `terms`."""

    Params: ClassVar[type[StrictModel]] = NoParams
    needs_teacher: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False

    def __init__(self, params: StrictModel | None = None) -> None:
        super().__init__()
        self.params = params if params is not None else self.Params()

    def student_layers(self) -> list[str]:
        return []

    def teacher_layers(self) -> list[str]:
        return []

    def build(self, shapes: FeatureShapes) -> None:
        """Create learnable parts once the hooked feature shapes are known (default: none)."""

    def terms(self, out: Outputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def teacher_logits(out: Outputs) -> Tensor:
    if out.teacher_logits is None:
        raise RuntimeError("this objective needs a teacher, but the distiller has none")
    return out.teacher_logits


def labels_of(out: Outputs, term: str) -> Tensor:
    if out.labels is None:
        raise RuntimeError(f"objective {term!r} needs labels, but the batch has none")
    return out.labels


def build_objective(spec: ObjectiveSpec | Mapping[str, Any]) -> Objective:
    """The term module for one entry (learnable parts are built later, by the distiller)."""
    spec = spec if isinstance(spec, ObjectiveSpec) else ObjectiveSpec.model_validate(spec)
    return OBJECTIVES.get(spec.name)(spec.params())


__all__ = [
    "FeatureShapes",
    "Objective",
    "ObjectiveSpec",
    "Outputs",
    "build_objective",
    "labels_of",
    "teacher_logits",
]
