"""Generalized KD (Agarwal et al. 2024): a λ-mixture of student samples and dataset, JSD_β."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import DivergenceMethodParams, LMMethod, LMParts, divergence_signal
from kdkit.registry import METHODS
from kdkit.samplers import MixtureParams


class GKDParams(DivergenceMethodParams, MixtureParams):
    divergence: str = "jsd"  # β defaults to 0.5, declared once by the divergence


@METHODS.register("gkd", "generalized KD: λ=0.5 mix of student samples and dataset, JSD β=0.5")
class GKD(LMMethod):
    Params = GKDParams

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("mixture", divergence_signal(params), "divergence")
