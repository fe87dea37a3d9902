"""Off-policy (supervised) KD for LMs: a divergence to the teacher on the dataset's completions."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import DivergenceMethodParams, LMMethod, LMParts, divergence_signal
from kdkit.registry import METHODS


@METHODS.register("supervised_kd", "LM off-policy KD: forward KL to the teacher on the dataset's completions")
class SupervisedKD(LMMethod):
    """Set kd_weight: 0, ce_weight: 1 for the no-teacher fine-tuning baseline."""

    Params = DivergenceMethodParams

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("dataset", divergence_signal(params), "divergence")
