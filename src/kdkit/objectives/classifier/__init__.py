"""Classifier/encoder objective terms (`OBJECTIVES`): one file per term, composed as weighted sums."""

from kdkit.objectives.classifier.at import ATTerm
from kdkit.objectives.classifier.base import (
    FeatureShapes,
    Objective,
    ObjectiveSpec,
    Outputs,
    build_objective,
    labels_of,
    teacher_logits,
)
from kdkit.objectives.classifier.ce import CrossEntropyTerm
from kdkit.objectives.classifier.dist import DISTTerm
from kdkit.objectives.classifier.dkd import DKDTerm
from kdkit.objectives.classifier.fitnet import FitNetTerm
from kdkit.objectives.classifier.kd import KDTerm

__all__ = [
    "ATTerm",
    "CrossEntropyTerm",
    "DISTTerm",
    "DKDTerm",
    "FeatureShapes",
    "FitNetTerm",
    "KDTerm",
    "Objective",
    "ObjectiveSpec",
    "Outputs",
    "build_objective",
    "labels_of",
    "teacher_logits",
]
