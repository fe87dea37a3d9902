"""FitNet hints (Romero et al. 2015): KD plus the MSE of a projected student feature."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kdkit.methods.base import ClassifierMethod
from kdkit.methods.kd import KDMethodParams, kd_entries
from kdkit.objectives.classifier.fitnet import FitNetParams
from kdkit.registry import METHODS


class FitNetMethodParams(KDMethodParams, FitNetParams):
    hint_weight: float = Field(1.0, ge=0.0)


@METHODS.register("fitnet", "FitNet hints (Romero et al. 2015): KD + MSE of a projected student feature")
class FitNet(ClassifierMethod):
    Params = FitNetMethodParams

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:
        hint = params.model_dump(include=set(FitNetParams.model_fields))
        return kd_entries(params) + [{"name": "fitnet", "weight": params.hint_weight, **hint}]
