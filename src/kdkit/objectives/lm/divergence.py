"""Token-level divergence to the teacher's full distribution: any entry of `DIVERGENCES`.

With a "logits" target the student's logits are compared directly; with a "hidden" target both
sides are projected in token chunks by the fused loss, so the [tokens × vocabulary] logits never
exist at once. Teacher and student vocabularies that differ only by embedding padding are compared
on their shared first ids (the distiller checks that they are one tokenizer first). With a "sparse"
target (a logit cache, a served teacher) the divergence is taken against the kept ids
(`kdkit.objectives.lm.sparse`).
"""

from __future__ import annotations

from typing import Any

from pydantic import PositiveFloat, PositiveInt
from torch import Tensor

from kdkit.losses import DIVERGENCES
from kdkit.losses.fused import fused_linear_divergence
from kdkit.losses.tokens import shared_vocab, shift
from kdkit.objectives.lm.base import LMObjective, StudentView
from kdkit.objectives.params import DivergenceChoice
from kdkit.registry import LM_OBJECTIVES
from kdkit.signals.base import LMHead, TeacherTarget


class DivergenceParams(DivergenceChoice):
    """`temperature` is the distillation temperature of the loss (never the sampling one);
    `chunk_size`: tokens per chunk of the fused loss (None: sized from the vocabulary)."""

    temperature: PositiveFloat = 1.0
    chunk_size: PositiveInt | None = None


def _fused_head(head: LMHead, rows: int) -> tuple[Tensor, Tensor | None]:
    """Weight and bias cut to the shared vocabulary, with a logit scale folded in."""
    if head.softcap is not None:
        raise ValueError(
            "the fused loss does not apply final-logit soft-capping yet; use the 'logits' signal"
        )
    weight, bias = head.weight[:rows], None if head.bias is None else head.bias[:rows]
    if head.scale != 1.0:  # scale·(h·Wᵀ + b) = h·(scale·W)ᵀ + scale·b, exactly
        weight = weight * head.scale
        bias = None if bias is None else bias * head.scale
    return weight, bias


@LM_OBJECTIVES.register(
    "divergence", "any token-level divergence D(p_T, p_S) to the teacher's full distribution"
)
class DivergenceObjective(LMObjective):
    Params = DivergenceParams
    accepts = ("logits", "hidden", "sparse")

    def __call__(
        self, student: StudentView, batch: dict[str, Any], target: TeacherTarget
    ) -> dict[str, Tensor]:
        p = self.params
        labels = batch["labels"]
        if target.hidden is not None:
            hidden, head = student.hidden
            assert target.head is not None
            shared = min(head.weight.shape[0], target.head.weight.shape[0])
            s_weight, s_bias = _fused_head(head, shared)
            t_weight, t_bias = _fused_head(target.head, shared)
            kd = fused_linear_divergence(
                hidden[:, :-1],
                s_weight,
                target.hidden[:, :-1],
                t_weight,
                divergence=p.divergence,
                temperature=p.temperature,
                mask=labels[:, 1:] != -100,
                reduction="mean",
                chunk_size=p.chunk_size,
                student_bias=s_bias,
                teacher_bias=t_bias,
                **p.divergence_params,
            )
            return {"kd": kd}
        self.check_target(target)
        if target.sparse is not None:  # a logit cache or a served teacher: kdkit.losses.sparse
            from kdkit.objectives.lm.sparse import sparse_token_divergence

            return {"kd": sparse_token_divergence(student.logits, labels, target.sparse, p)}
        assert target.logits is not None
        return {"kd": token_divergence(student.logits, target.logits, labels, p)}


def token_divergence(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, params: DivergenceParams
) -> Tensor:
    """Mean per-token divergence (nats, no T² factor) over the trained tokens.

    student_logits: [B, T, V_S], teacher_logits: [B, T, V_T], labels: [B, T]. Returns a scalar; 0
    with zero gradients when no token counts.
    """
    student, _, mask = shift(student_logits, labels)
    student, teacher = shared_vocab(student, teacher_logits[:, :-1])
    fn = DIVERGENCES.get(params.divergence)
    return fn(
        student,
        teacher,
        temperature=params.temperature,
        mask=mask,
        reduction="mean",
        **params.divergence_params,
    )
