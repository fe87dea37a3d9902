"""kdkit's registries: every name a config can use resolves through one of these.

- `DIVERGENCES` (in `kdkit.losses`): token-distribution divergences, e.g. "fkl", "rkl", "jsd".
- `OBJECTIVES`: loss terms a classifier/encoder config composes as a weighted sum, e.g. "kd", "dkd".
- `METHODS`: named recipes (a sampler × teacher signal × objective choice with defaults).

`kdkit methods` prints them all with their one-line descriptions.
"""

from __future__ import annotations

from typing import Any

from kdkit.losses.registry import Registry, UnknownNameError

OBJECTIVES: Registry[Any] = Registry("objective")
METHODS: Registry[Any] = Registry("method")

__all__ = ["Registry", "UnknownNameError", "OBJECTIVES", "METHODS"]
