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
from kdkit.losses.tokens import first_trained_position
from kdkit.models.heads import backbone_and_head, logits_from
from kdkit.samplers.fast_decode import LeanDecoder, trainable_student_decoder
from kdkit.settings import LMContext, NoParams
from kdkit.signals.base import LinearHead, TeacherTarget, model_inputs


class StudentView:
    """The student's forward pass on one batch, computed lazily and at most once.

    logits: [B, T, V] (the model's own output, post-head transforms included);
    trained_logits: (logits [B, T - s, V], labels [B, T - s]) from s = the first position any
        label is predicted from (`first_trained_position`): the prompt positions before it are
        never projected to the vocabulary, which is most of the head's and the loss's work when
        prompts are long; a loss over them equals the loss over the full logits;
    hidden: ([B, T, H] final hidden states, `LinearHead`) for fused losses.

    A Llama / Mistral / Qwen2 / Qwen3 student runs through a trainable `LeanDecoder` (the same
    function as its forward, gradients to its own parameters, in about half the tensor ops) where
    `trainable_student_decoder` finds it exact, else through its own forward; `KDKIT_LEAN_STUDENT=0`
    turns the lean path off.
    """

    def __init__(self, model: nn.Module, batch: dict[str, Any]) -> None:
        self.model, self.batch = model, batch

    @cached_property
    def lean(self) -> LeanDecoder | None:
        return trainable_student_decoder(self.model, self.batch["input_ids"].device.type)

    def _lean_hidden(self, start: int) -> Tensor:
        assert self.lean is not None
        return self.lean.hidden(self.batch["input_ids"], self.batch.get("attention_mask"), start)

    @cached_property
    def logits(self) -> Tensor:
        with phase("student_forward"):
            if self.lean is not None:
                return self.lean.logits(self._lean_hidden(0))
            return self.model(**model_inputs(self.batch)).logits

    @cached_property
    def start(self) -> int:
        """The first position whose logits a completion loss reads (see `trained_logits`)."""
        return first_trained_position(self.batch["labels"])

    @cached_property
    def trained_logits(self) -> tuple[Tensor, Tensor]:
        labels = self.batch["labels"][:, self.start :]
        if self.has_logits:  # the full logits exist already: a view, no second forward pass
            return self.logits[:, self.start :], labels
        with phase("student_forward"):
            if self.lean is not None:
                return self.lean.logits(self._lean_hidden(self.start)), labels
            return logits_from(self.model, model_inputs(self.batch), self.start), labels

    @cached_property
    def hidden(self) -> tuple[Tensor, LinearHead]:
        backbone, head = backbone_and_head(self.model)
        with phase("student_forward"):
            if self.lean is not None:
                return self._lean_hidden(0), head
            return backbone(**model_inputs(self.batch)).last_hidden_state, head

    @property
    def has_logits(self) -> bool:
        return "logits" in self.__dict__

    @property
    def has_trained_logits(self) -> bool:
        return "trained_logits" in self.__dict__


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
