"""Attention transfer (Zagoruyko & Komodakis 2017): match normalised spatial attention maps."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from kdkit.losses import features as feat_losses
from kdkit.objectives.classifier.base import FeatureShapes, Objective, Outputs
from kdkit.registry import OBJECTIVES
from kdkit.settings import StrictModel


class ATParams(StrictModel):
    pairs: list[tuple[str, str]] = Field(
        default_factory=lambda: [("stage1", "stage1"), ("stage2", "stage2")],
        description="(student module, teacher module) pairs",
    )
    p: float = Field(2.0, gt=0.0)


@OBJECTIVES.register("at", "attention transfer: match normalised spatial attention maps of layer pairs")
class ATTerm(Objective):
    """Term "at": attention-transfer loss summed over the (student, teacher) layer pairs; each
    map is Σ_c |F_c|^p over channels, flattened and L2-normalised (Zagoruyko & Komodakis 2017)."""

    Params = ATParams

    def student_layers(self) -> list[str]:
        return [s for s, _ in self.params.pairs]

    def teacher_layers(self) -> list[str]:
        return [t for _, t in self.params.pairs]

    def build(self, shapes: FeatureShapes) -> None:
        for s, t in self.params.pairs:
            if len(shapes.student[s]) != 3 or len(shapes.teacher[t]) != 3:
                raise ValueError(
                    f"at: attention maps need [C,H,W] features, got {s} {shapes.student[s]} and "
                    f"{t} {shapes.teacher[t]}"
                )

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        student = [out.student_features[s] for s, _ in self.params.pairs]
        teacher = [out.teacher_features[t] for _, t in self.params.pairs]
        # the loss pools the larger map of a pair to the smaller size itself
        return {"at": feat_losses.attention_transfer_loss(student, teacher, p=self.params.p)}
