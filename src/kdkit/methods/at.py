"""Attention transfer (Zagoruyko & Komodakis 2017): CE + spatial attention-map match."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kdkit.methods.base import ClassifierMethod
from kdkit.objectives.classifier.at import ATParams
from kdkit.registry import METHODS


class ATMethodParams(ATParams):
    at_weight: float = Field(500.0, ge=0.0)  # β/2 with β = 1000, as in the reference code


@METHODS.register("at", "attention transfer (Zagoruyko & Komodakis 2017): CE + spatial attention-map match")
class AT(ClassifierMethod):
    Params = ATMethodParams

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:
        maps = params.model_dump(include=set(ATParams.model_fields))
        return [{"name": "ce"}, {"name": "at", "weight": params.at_weight, **maps}]
