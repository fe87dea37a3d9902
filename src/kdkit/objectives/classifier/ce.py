"""Hard-label cross-entropy: the one supervised term of every classifier method."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdkit.objectives.classifier.base import Objective, Outputs, labels_of
from kdkit.registry import OBJECTIVES
from kdkit.settings import StrictModel


class CEParams(StrictModel):
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@OBJECTIVES.register("ce", "hard-label cross-entropy (nats); needs labels")
class CrossEntropyTerm(Objective):
    Params = CEParams
    needs_teacher = False
    needs_labels = True

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        smoothing = self.params.label_smoothing
        return {"ce": F.cross_entropy(out.student_logits, labels_of(out, "ce"), label_smoothing=smoothing)}
