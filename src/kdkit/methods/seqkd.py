"""Sequence-level KD (Kim & Rush 2016): train on the teacher's own completions of the prompts."""

from __future__ import annotations

from typing import Any

from kdkit.methods.base import DivergenceMethodParams, LMMethod, LMParts, divergence_signal
from kdkit.registry import METHODS
from kdkit.samplers import GenerationParams


class SeqKDParams(DivergenceMethodParams, GenerationParams):
    pass


@METHODS.register("seqkd", "sequence-level KD: forward KL on the teacher's own sampled completions")
class SeqKD(LMMethod):
    Params = SeqKDParams

    @classmethod
    def parts(cls, params: Any) -> LMParts:
        return LMParts("teacher", divergence_signal(params), "divergence")
