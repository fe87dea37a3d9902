"""Decoupled KD (Zhao et al. 2022): CE + α·TCKD + β·NCKD."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import ClassifierMethod
from kdkit.objectives.classifier.dkd import DKDParams
from kdkit.registry import METHODS


@METHODS.register("dkd", "decoupled KD (Zhao et al. 2022): CE + α·TCKD + β·NCKD")
class DKD(ClassifierMethod):
    Params = DKDParams

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:
        return [{"name": "ce"}, {"name": "dkd", **params.model_dump()}]
