"""MiniLLM-style reverse KL by policy gradient (Gu et al. 2024): reward-to-go log(p_T/p_S) on a
0.8 student / 0.2 teacher sample mix (per batch here)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kdkit.methods.base import LMMethod, LMParts, LMWeights
from kdkit.objectives.lm import SampledTokenParams
from kdkit.registry import METHODS
from kdkit.samplers import MixtureParams


class MiniLLMParams(LMWeights, SampledTokenParams, MixtureParams):
    lmbda: float = Field(0.8, ge=0.0, le=1.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)


@METHODS.register(
    "minillm",
    "MiniLLM-style reverse KL by policy gradient: reward-to-go log(p_T/p_S), 0.8 student / 0.2 teacher",
)
class MiniLLM(LMMethod):
    Params = MiniLLMParams

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("student_teacher", "token_logprobs", "sampled_token")
