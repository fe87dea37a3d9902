"""What every LM objective shares: the student's outputs computed once per batch, and the base class.

An LM objective is `objective(student: StudentView, batch, target: TeacherTarget) -> dict` of raw
(unweighted) terms, each a mean over the tokens trained on (labels != -100 after the shift). It
declares which teacher-target fields it `accepts`; `LMDistiller` weights its "kd" term and adds
the optional cross-entropy term from the same `StudentView`, so the student runs forward once.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

from torch import Tensor, nn

from kdkit.engine.phases import phase
from kdkit.models.heads import backbone_and_head
from kdkit.settings import LMContext, NoParams
from kdkit.signals.base import LinearHead, TeacherTarget, model_inputs


class StudentView:
    """The student's forward pass on one batch, computed lazily and at most once.

    logits: [B, T, V] (the model's own output, post-head transforms included);
    hidden: ([B, T, H] final hidden states, `LinearHead`) for fused losses.
    """

    def __init__(self, model: nn.Module, batch: dict[str, Any]) -> None:
        self.model, self.batch = model, batch

    @cached_property
    def logits(self) -> Tensor:
        with phase("student_forward"):
            return self.model(**model_inputs(self.batch)).logits

    @cached_property
    def hidden(self) -> tuple[Tensor, LinearHead]:
        backbone, head = backbone_and_head(self.model)
        with phase("student_forward"):
            return backbone(**model_inputs(self.batch)).last_hidden_state, head

    @property
    def has_logits(self) -> bool:
        return "logits" in self.__dict__


class LMObjective:
    """Base of registered LM objectives: `Params`, the target fields accepted, the build context."""

    Params: ClassVar[type] = NoParams
    accepts: ClassVar[tuple[str, ...]] = ("logits",)

    def __init__(self, params: Any | None = None, ctx: LMContext | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.ctx = ctx or LMContext()

    def __call__(
        self, student: StudentView, batch: dict[str, Any], target: TeacherTarget
    ) -> dict[str, Tensor]:
        raise NotImplementedError  # pragma: no cover

    def check_target(self, target: TeacherTarget) -> None:
        if not any(kind in self.accepts for kind in target.kinds()):
            raise ValueError(
                f"{type(self).__name__} needs a teacher signal giving one of {self.accepts}, "
                f"got {target.kinds() or 'none'}"
            )


__all__ = ["LMObjective", "StudentView"]
