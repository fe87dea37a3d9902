"""What a teacher signal hands to an LM objective: `TeacherTarget`, and the shared signal base.

A teacher signal is `signal(batch, *, teacher) -> TeacherTarget`, run under no_grad (the teacher
never trains). Registered signals are classes built as `Signal(params, ctx)`; `provides` names the
target field it fills, and an objective declares which fields it `accepts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from kdkit.losses.fused import LinearHead
from kdkit.settings import LMContext, NoParams


@dataclass
class SparseTarget:
    """A sparse teacher distribution per position (cached or served).

    ids: [..., K] long token ids; logprobs: [..., K] teacher log-probabilities of those ids (None
    for random-sampling targets that store only counts); weights: [..., K] importance weights
    (random-sampling targets) or None (top-k); tail_logprob: [...] log of the teacher mass outside
    `ids`, or None when unknown; entropy: [...] H(p_T) where known (makes sampled forward-KL values
    comparable with dense ones). The losses are in `kdkit.losses.sparse`.
    """

    ids: Tensor
    logprobs: Tensor | None = None
    weights: Tensor | None = None
    tail_logprob: Tensor | None = None
    entropy: Tensor | None = None

    def from_position(self, start: int) -> SparseTarget:
        """The target of shifted positions start.. only (views): pairs with logits from `start`."""
        if start == 0:
            return self
        cut = {name: getattr(self, name) for name in ("logprobs", "weights", "tail_logprob", "entropy")}
        return SparseTarget(
            self.ids[:, start:], **{name: None if v is None else v[:, start:] for name, v in cut.items()}
        )


@dataclass
class TeacherTarget:
    """The teacher's signal for one batch (positions aligned with the batch's tokens).

    logits: [B, T - start, V] next-token logits of positions start..T-1.
    start: the first position `logits` covers (0 = all); the positions before it predict no
        trained label (`first_trained_position`), so a completion loss never reads them.
    hidden: [B, T, H] final (normed) hidden states, with `head` (a `LinearHead`: weight, bias and
        post-head logit transform) to project them (fused losses).
    token_logprobs: [B, T-1] log p_T(label_{t+1} | ≤t) at temperature 1, aligned with shifted labels.
    behaviour_logprobs: [B, T-1] log-probs of the labels under the policy that sampled them, where
        the teacher sampled them at a temperature other than 1 (importance weights need it).
    sparse: a `SparseTarget` over shifted positions [B, T-1, K].
    """

    logits: Tensor | None = None
    hidden: Tensor | None = None
    head: LinearHead | None = None
    token_logprobs: Tensor | None = None
    behaviour_logprobs: Tensor | None = None
    sparse: SparseTarget | None = None
    start: int = 0

    def logits_from(self, start: int) -> Tensor:
        """`logits` of positions start..T-1 (start >= self.start): [B, T - start, V]."""
        assert self.logits is not None
        if start < self.start:
            raise ValueError(f"the teacher's logits start at position {self.start}, not {start}")
        return self.logits[:, start - self.start :]

    def kinds(self) -> tuple[str, ...]:
        """The fields that are set, e.g. ("logits",)."""
        names = ("logits", "hidden", "token_logprobs", "sparse")
        return tuple(name for name in names if getattr(self, name) is not None)


class TeacherSignal:
    """Base of registered signals: parameters, context, and the kind of target provided."""

    Params: ClassVar[type] = NoParams
    provides: ClassVar[str] = "?"
    needs_teacher_model: ClassVar[bool] = True

    def __init__(self, params: Any | None = None, ctx: LMContext | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.ctx = ctx or LMContext()

    def __call__(
        self, batch: dict[str, Any], *, teacher: nn.Module | None
    ) -> TeacherTarget:  # pragma: no cover
        raise NotImplementedError


def model_inputs(batch: dict[str, Any]) -> dict[str, Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def require_teacher(teacher: nn.Module | None, signal: str) -> nn.Module:
    if teacher is None:
        raise ValueError(f"the {signal!r} teacher signal needs a teacher model, but none was given")
    return teacher


__all__ = ["LinearHead", "SparseTarget", "TeacherSignal", "TeacherTarget", "model_inputs", "require_teacher"]
