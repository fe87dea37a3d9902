"""kdkit's registries: every name a config can use resolves through one of these.

- `DIVERGENCES` (in `kdkit.losses`): token-distribution divergences, e.g. "fkl", "rkl", "jsd".
- `OBJECTIVES`: loss terms a classifier/encoder config composes as a weighted sum, e.g. "kd", "dkd".
- `LM_OBJECTIVES`: what an LM method minimises given the teacher's signal ("divergence", ...).
- `SAMPLERS`: where LM training sequences come from ("dataset", "student", "mixture", ...).
- `TEACHER_SIGNALS`: what the teacher gives ("logits", "hidden", "token_logprobs", ...).
- `REWARDS`: scalar rewards of generated sequences (for policy-gradient methods).
- `METHODS`: named methods of every kind, each a small file choosing one entry per axis.

Each entry of the last six is a class with a pydantic `Params` model; entries are registered when
their module is imported. `load_builtins()` imports kdkit's own entries (and is what front doors
call before validating a config), so lower layers never import the implementations statically.
`kdkit methods` prints them all with their one-line descriptions and parameters.
"""

from __future__ import annotations

import importlib
from typing import Any

from kdkit.losses.registry import Param, Registry, UnknownNameError

OBJECTIVES: Registry[Any] = Registry("objective")
LM_OBJECTIVES: Registry[Any] = Registry("LM objective")
SAMPLERS: Registry[Any] = Registry("sampler")
TEACHER_SIGNALS: Registry[Any] = Registry("teacher signal")
REWARDS: Registry[Any] = Registry("reward")
METHODS: Registry[Any] = Registry("method")

#: Packages whose import registers kdkit's built-in entries (each imports its own entry files).
BUILTIN_PACKAGES = (
    "kdkit.losses",
    "kdkit.samplers",
    "kdkit.signals",
    "kdkit.objectives",
    "kdkit.rewards",
    "kdkit.methods",
)


def load_builtins() -> None:
    """Register kdkit's built-in samplers, signals, objectives and methods (idempotent)."""
    for name in BUILTIN_PACKAGES:
        importlib.import_module(name)


__all__ = [
    "BUILTIN_PACKAGES",
    "LM_OBJECTIVES",
    "METHODS",
    "OBJECTIVES",
    "REWARDS",
    "SAMPLERS",
    "TEACHER_SIGNALS",
    "Param",
    "Registry",
    "UnknownNameError",
    "load_builtins",
]
