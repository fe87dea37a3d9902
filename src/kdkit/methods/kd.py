"""Hinton KD for classifiers: soft targets at temperature T (any divergence) mixed with CE."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kdkit.methods.base import ClassifierMethod
from kdkit.objectives.classifier.kd import KDParams
from kdkit.registry import METHODS


class KDMethodParams(KDParams):
    """alpha: weight of the soft-target term; 1 − alpha goes to hard-label CE (dropped at α = 1,
    and on unlabelled data)."""

    alpha: float = Field(0.9, ge=0.0, le=1.0)


def kd_entries(params: KDMethodParams) -> list[dict[str, Any]]:
    """[ce with weight 1−α, kd with weight α] (zero-weight entries dropped)."""
    soft = params.model_dump(include=set(KDParams.model_fields))
    entries = [{"name": "ce", "weight": 1.0 - params.alpha}, {"name": "kd", "weight": params.alpha, **soft}]
    return [entry for entry in entries if entry["weight"] > 0]


@METHODS.register("kd", "Hinton KD for classifiers: α·T²·D(p_T^τ, p_S^τ) + (1−α)·CE, any divergence")
class KD(ClassifierMethod):
    Params = KDMethodParams

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:
        return kd_entries(params)
