"""FitNet hints (Romero et al. 2015): a projected student feature matches a teacher feature."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.losses import features as feat_losses
from kdkit.objectives.classifier.base import FeatureShapes, Objective, Outputs
from kdkit.registry import OBJECTIVES
from kdkit.settings import StrictModel


class FitNetParams(StrictModel):
    student_layer: str = "stage2"
    teacher_layer: str = "stage2"
    projector: Literal["auto", "conv", "linear", "none"] = "auto"
    loss: Literal["mse", "cosine"] = "mse"


@OBJECTIVES.register(
    "fitnet", "FitNet hint: projector(student feature) ≈ teacher feature (MSE), by module name"
)
class FitNetTerm(Objective):
    """Term "fitnet": MSE between projector(student feature) and the teacher feature, averaged
    over elements. The projector is a 1×1 conv + BN for [B,C,H,W] features ("auto" picks it) or a
    linear map for [B,D] ones; spatial sizes that differ are average-pooled to the smaller one."""

    Params = FitNetParams

    def student_layers(self) -> list[str]:
        return [self.params.student_layer]

    def teacher_layers(self) -> list[str]:
        return [self.params.teacher_layer]

    def build(self, shapes: FeatureShapes) -> None:
        p = self.params
        s_shape, t_shape = shapes.student[p.student_layer], shapes.teacher[p.teacher_layer]
        kind = p.projector
        if kind == "auto":
            kind = "conv" if len(s_shape) == 3 else "linear"
        if kind == "none":
            if s_shape[0] != t_shape[0]:
                raise ValueError(
                    f"fitnet: projector 'none' needs equal widths, got student {p.student_layer} "
                    f"{s_shape} and teacher {p.teacher_layer} {t_shape}"
                )
            self.projector: nn.Module = nn.Identity()
        elif kind == "conv":
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ValueError(
                    f"fitnet: a conv projector needs [C,H,W] features, got {s_shape} → {t_shape}"
                )
            self.projector = nn.Sequential(
                nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False), nn.BatchNorm2d(t_shape[0])
            )
        else:
            self.projector = nn.Linear(_flat(s_shape), _flat(t_shape))

    def terms(self, out: Outputs) -> dict[str, Tensor]:
        p = self.params
        student = out.student_features[p.student_layer]
        teacher = out.teacher_features[p.teacher_layer]
        if isinstance(self.projector, nn.Linear):
            student = self.projector(student.flatten(1))
            teacher = teacher.flatten(1)
        else:
            student = self.projector(student)
            student, teacher = _same_spatial(student, teacher)
        if p.loss == "cosine":
            return {"fitnet": feat_losses.cosine_feature_loss(student.flatten(1), teacher.flatten(1))}
        return {"fitnet": feat_losses.hint_loss(student, teacher)}


def _flat(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _same_spatial(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two [B,C,H,W] maps to the other's H×W (no-op when equal)."""
    if student.ndim != 4 or student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    return F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
