"""Classifier baseline: the student on hard labels alone (no teacher)."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import ClassifierMethod
from kdkit.objectives.classifier.ce import CEParams
from kdkit.registry import METHODS


@METHODS.register("scratch", "classifier baseline: the student on hard labels alone (no teacher)")
class Scratch(ClassifierMethod):
    Params = CEParams

    @classmethod
    def objectives(cls, params: Any) -> list[dict[str, Any]]:
        return [{"name": "ce", **params.model_dump()}]
