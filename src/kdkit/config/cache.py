"""The `caches:` section of an LM run config: teacher-logit caches that students can train from.

```yaml
caches:
  topk32: {mode: topk, k: 32}                    # + tail mass; values: uint8 for 1 byte per value
  sampled12: {mode: sampled, draws: 12}          # random-sampling KD, unbiased forward KL
students:
  - {name: fkl_topk32, method: supervised_kd, cache: topk32}
```

`kdkit cache CONFIG` builds every cache of the run (or those named with --only) over the run's
teacher and training data; `kdkit run CONFIG` builds any that are missing or unfinished before its
students train, so the cache step is never a prerequisite to remember. See `kdkit.cache.format` for
what each mode stores and its bytes per token.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from kdkit.cache.format import CacheSettings
from kdkit.settings import StrictModel


class CacheConfig(StrictModel):
    """One cache: how the teacher's distribution is sampled and stored, and where.

    path: the cache folder; default `$KDKIT_CACHE/logits/<run name>-<cache name>-<hash of teacher,
        data and these settings>`, so changing any of them builds a new cache instead of clashing.
    batch_size: teacher batch while caching.
    """

    mode: Literal["topk", "sampled", "dense"] = "topk"
    k: PositiveInt = 32
    tail: bool = True
    values: Literal["float16", "uint8"] = "float16"
    draws: int = Field(12, ge=1, le=255)
    proposal_temperature: PositiveFloat = 1.0
    temperature: PositiveFloat = 1.0
    seed: int = 0
    samples_per_shard: PositiveInt = 256
    max_dense_vocab: PositiveInt = 4096
    path: str | None = None
    batch_size: PositiveInt = 16

    def settings(self) -> CacheSettings:
        return CacheSettings(**self.model_dump(exclude={"path", "batch_size"}))


__all__ = ["CacheConfig"]
