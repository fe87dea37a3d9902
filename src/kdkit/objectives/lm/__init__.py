"""What an LM method minimises given the teacher's signal (`LM_OBJECTIVES`): one file per objective."""

from kdkit.objectives.lm.base import LMObjective, StudentView
from kdkit.objectives.lm.ce import (
    chunked_cross_entropy,
    completion_cross_entropy,
    student_cross_entropy,
)
from kdkit.objectives.lm.divergence import DivergenceObjective, DivergenceParams, token_divergence
from kdkit.objectives.lm.dpo import DPOObjective, DPOParams
from kdkit.objectives.lm.sampled_token import (
    SampledTokenObjective,
    SampledTokenParams,
    discounted_returns,
    sampled_token_loss,
)

__all__ = [
    "DPOObjective",
    "DPOParams",
    "DivergenceObjective",
    "DivergenceParams",
    "LMObjective",
    "SampledTokenObjective",
    "SampledTokenParams",
    "StudentView",
    "chunked_cross_entropy",
    "completion_cross_entropy",
    "discounted_returns",
    "sampled_token_loss",
    "student_cross_entropy",
    "token_divergence",
]
