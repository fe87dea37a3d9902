"""DIST (Huang et al. 2022): CE + Pearson-correlation relations of predictions."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import ClassifierMethod
from kdkit.objectives.classifier.dist import DISTParams
from kdkit.registry import METHODS


@METHODS.register("dist", "DIST (Huang et al. 2022): CE + Pearson-correlation relations of predictions")
class DIST(ClassifierMethod):
    Params = DISTParams

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:
        return [{"name": "ce"}, {"name": "dist", **params.model_dump()}]
