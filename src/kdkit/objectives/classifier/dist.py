"""DIST (Huang et al. 2022): Pearson-correlation relations of predictions, inter- and intra-class."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdkit.losses import classification as cls_losses
from kdkit.objectives.classifier.base import Objective, Outputs, teacher_logits
from kdkit.registry import OBJECTIVES
from kdkit.settings import StrictModel


class DISTParams(StrictModel):
    beta: float = Field(1.0, ge=0.0)  # inter-class relation (per example, across classes)
    gamma: float = Field(1.0, ge=0.0)  # intra-class relation (per class, across the batch)
    temperature: float = Field(1.0, gt=0.0)


@OBJECTIVES.register("dist", "DIST: Pearson-correlation match of predictions, inter- and intra-class")
class DISTTerm(Objective):
    """Terms "dist_inter" = β·(1 − mean Pearson r over examples) and "dist_intra" = γ·(1 − mean
    Pearson r over classes), both ×T², of softmax(·/T)."""

    Params = DISTParams

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        student, teacher = out.student_logits, teacher_logits(out)
        # two calls (logits only, cheap) so the report can show each relation term on its own
        inter = cls_losses.dist_loss(student, teacher, beta=1.0, gamma=0.0, temperature=p.temperature)
        intra = cls_losses.dist_loss(student, teacher, beta=0.0, gamma=1.0, temperature=p.temperature)
        return {"dist_inter": p.beta * inter, "dist_intra": p.gamma * intra}
