"""Off-policy: train on the dataset's own completions (supervised KD)."""

from __future__ import annotations

from torch import nn

from kdkit.registry import SAMPLERS
from kdkit.samplers.base import Batch, LMContext, NoParams


@SAMPLERS.register("dataset", "the dataset's own completions (off-policy, supervised KD)")
class DatasetSampler:
    """The batch passes through unchanged, tagged `source="dataset"`."""

    Params = NoParams
    source = "dataset"
    generates = False

    def __init__(self, params: NoParams | None = None, ctx: LMContext | None = None) -> None:
        self.params = params or NoParams()

    def __call__(self, batch: Batch, *, student: nn.Module, teacher: nn.Module | None) -> Batch:
        out = dict(batch)
        out["source"] = self.source
        out["sampler_info"] = {"generation_s": 0.0}  # nothing generated (and nothing read from a GPU)
        return out
