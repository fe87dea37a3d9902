"""On-policy KD from the teacher's log-probs of the student's sampled tokens only."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import LMMethod, LMParts, LMWeights
from kdkit.objectives.lm import SampledTokenParams
from kdkit.registry import METHODS
from kdkit.samplers import GenerationParams


class SampledTokenMethodParams(LMWeights, SampledTokenParams, GenerationParams):
    pass


@METHODS.register(
    "sampled_token",
    "on-policy KD from the teacher's log-probs of the student's sampled tokens only (advantage PG)",
)
class SampledToken(LMMethod):
    Params = SampledTokenMethodParams

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("student", "token_logprobs", "sampled_token")
