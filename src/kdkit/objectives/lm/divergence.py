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
from kdkit.losses.fused import fused_causal_lm_losses
from kdkit.losses.tokens import shared_vocab, shift
from kdkit.objectives.lm.base import LMObjective, StudentView
from kdkit.objectives.params import DivergenceChoice
from kdkit.registry import LM_OBJECTIVES
from kdkit.signals.base import TeacherTarget


class DivergenceParams(DivergenceChoice):
    """`temperature` is the distillation temperature of the loss (never the sampling one);
    `chunk_size`: tokens per chunk of the fused loss (None: sized from the vocabulary)."""

    temperature: PositiveFloat = 1.0
    chunk_size: PositiveInt | None = None


@LM_OBJECTIVES.register(
    "divergence", "any token-level divergence D(p_T, p_S) to the teacher's full distribution"
)
class DivergenceObjective(LMObjective):
    Params = DivergenceParams
    accepts = ("logits", "hidden", "sparse")

    def __call__(
        self, student: StudentView, batch: dict[str, Any], target: TeacherTarget, *, ce_ratio: float = 0.0
    ) -> dict[str, Tensor]:
        p = self.params
        labels = batch["labels"]
        if target.hidden is not None:
            assert target.head is not None
            hidden, head = student.hidden
            out = fused_causal_lm_losses(
                hidden,
                head,
                target.hidden,
                target.head,
                labels,
                divergence=p.divergence,
                temperature=p.temperature,
                ce_weight=ce_ratio,
                chunk_size=p.chunk_size,
                **p.divergence_params,
            )
            if ce_ratio == 0:
                return {"kd": out.loss}
            # one chunk pass gave the gradient of kd + ce_ratio·ce: keep it on "kd" with kd's value
            return {"kd": out.loss - ce_ratio * out.ce, "ce": out.ce}
        self.check_target(target)
        if target.sparse is not None:  # a logit cache or a served teacher: kdkit.losses.sparse
            from kdkit.objectives.lm.sparse import sparse_terms

            return sparse_terms(student, labels, target.sparse, p, ce_ratio=ce_ratio)
        assert target.logits is not None
        # only positions that predict a trained label: the same value, without the prompt's logits
        logits, window_labels = student.trained_logits
        return {"kd": token_divergence(logits, target.logits_from(student.start), window_labels, p)}


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
