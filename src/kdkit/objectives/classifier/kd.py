"""Soft targets: any divergence between the teacher's and the student's tempered predictions."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdkit.losses import classification as cls_losses
from kdkit.objectives.classifier.base import Objective, Outputs, teacher_logits
from kdkit.objectives.params import DivergenceChoice
from kdkit.registry import OBJECTIVES


class KDParams(DivergenceChoice):
    """temperature T; t2_scaling: ×T² keeps the soft-target gradients' scale independent of T
    (Hinton et al.); divergence: any `DIVERGENCES` entry (forward KL by default)."""

    temperature: float = Field(4.0, gt=0.0)
    t2_scaling: bool = True


@OBJECTIVES.register("kd", "soft targets: [T²·]D(p_T^τ, p_S^τ) with any divergence (forward KL = Hinton KD)")
class KDTerm(Objective):
    """Term "kd" = [T²·] D(softmax(t/T), softmax(s/T)) (batch mean, nats). Needs no labels, so it
    trains on unlabelled transfer sets; Hinton's label term is the separate `ce` objective."""

    Params = KDParams

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        soft = cls_losses.kd_loss(
            out.student_logits,
            teacher_logits(out),
            temperature=p.temperature,
            t2_scaling=p.t2_scaling,
            divergence=p.divergence,
            **p.divergence_params,
        )
        return {"kd": soft}
