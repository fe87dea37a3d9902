"""On-policy KD: reverse KL on the student's own samples (no exposure bias)."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import DivergenceMethodParams, LMMethod, LMParts, divergence_signal
from kdkit.registry import METHODS
from kdkit.samplers import GenerationParams


class OnPolicyParams(DivergenceMethodParams, GenerationParams):
    divergence: str = "rkl"  # mode-seeking: the usual on-policy choice


@METHODS.register("on_policy", "on-policy KD: reverse KL on the student's own samples (no exposure bias)")
class OnPolicy(LMMethod):
    Params = OnPolicyParams

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("student", divergence_signal(params), "divergence")
