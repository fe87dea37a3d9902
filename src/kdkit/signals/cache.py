"""Teacher signal read from a logit cache built by `kdkit cache`: the teacher does not run in training.

Off-policy only: a cache holds the teacher's distribution at the positions of the dataset's own
sequences, so a batch from any other sampler (teacher generations, the student's samples) is
refused. Each batch row is checked against the cached sample (CRC of its tokens and labels), so a
changed dataset or tokenization cannot silently train on misaligned targets.

What the objective receives:
- top-k caches: a `SparseTarget` (ids, log-probs at the cache's temperature, the tail mass unless
  `cache_tail` is false, which renormalises the teacher over the kept ids);
- random-sampling caches: a `SparseTarget` with importance weights (forward KL only: the other
  divergences need the teacher's probabilities where the student puts mass);
- dense caches: full `logits` (the stored log-probs scaled back by the cache temperature, so the
  loss's own temperature applies exactly as to live logits).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import PositiveFloat
from torch import nn

from kdkit.cache.batch import batch_target
from kdkit.cache.reader import CacheReader
from kdkit.registry import TEACHER_SIGNALS
from kdkit.settings import ConfigError, LMContext, ParamsModel
from kdkit.signals.base import SparseTarget, TeacherSignal, TeacherTarget


class CacheSignalParams(ParamsModel):
    """cache: the cache folder (a run config may name one of its `caches:` instead; the pipeline
    resolves the name). cache_tail: use the tail bucket of a top-k cache (false: renormalise over
    the kept ids). temperature and divergence are the objective's, checked against the cache."""

    cache: str | None = None
    cache_tail: bool = True
    temperature: PositiveFloat = 1.0
    divergence: str = "fkl"


@TEACHER_SIGNALS.register(
    "cache", "the teacher's distribution read from a logit cache (top-k + tail, sampled or dense), off-policy"
)
class CacheSignal(TeacherSignal):
    Params = CacheSignalParams
    provides = "sparse"
    needs_teacher_model = False

    def __init__(self, params: Any | None = None, ctx: LMContext | None = None) -> None:
        super().__init__(params, ctx)
        p = self.params
        if not p.cache:
            raise ConfigError("the 'cache' teacher signal needs cache: <a folder built by `kdkit cache`>")
        self.reader = CacheReader(p.cache)
        settings = self.reader.settings
        if settings.mode != "dense" and settings.temperature != p.temperature:
            raise ConfigError(
                f"the cache at {p.cache} holds the teacher at temperature {settings.temperature}, the loss "
                f"asks for {p.temperature}: sparse targets cannot be re-tempered; build a cache at this "
                "temperature"
            )
        if settings.mode == "sampled" and p.divergence not in ("fkl", "forward_kl"):
            raise ConfigError(
                f"a random-sampling cache gives an unbiased forward KL only, not {p.divergence!r} (the "
                "other divergences need the teacher's probabilities where the student puts mass); use "
                "divergence: fkl, or a top-k cache with its tail"
            )
        self.provides = "logits" if settings.mode == "dense" else "sparse"

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], *, teacher: nn.Module | None) -> TeacherTarget:
        source = batch.get("source", "dataset")
        if source != "dataset":
            raise ValueError(
                "a logit cache holds the teacher's distributions on the dataset's sequences only, but this "
                f"batch came from the {source!r} sampler; on-policy or generated sequences need a live "
                "teacher (drop `cache:` for this student)"
            )
        target = batch_target(self.reader, batch)
        device = batch["input_ids"].device
        target = {k: v.to(device) for k, v in target.items()}
        settings = self.reader.settings
        if settings.mode == "dense":
            # T_c·log softmax(z/T_c) = z − const: softmax of it over any T is softmax(z/T), exactly
            logits = target["logprobs"] * settings.temperature
            pad = logits.new_zeros(logits.shape[0], 1, logits.shape[2])
            return TeacherTarget(logits=torch.cat([logits, pad], dim=1))
        return TeacherTarget(
            sparse=SparseTarget(
                ids=target["ids"],
                logprobs=target.get("logprobs"),
                weights=target.get("weights"),
                tail_logprob=target.get("tail_logprob") if self.params.cache_tail else None,
                entropy=target.get("entropy"),
            )
        )
