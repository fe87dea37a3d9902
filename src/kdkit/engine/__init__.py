"""The training engine: the `Distiller` contract, its settings and one Accelerate loop for every method.

Everything is imported lazily: `kdkit.config` imports `kdkit.engine.settings` (pydantic only) to
validate a run's `train:` section without paying for torch, and methods importing
`kdkit.engine.distiller` do not pay for Accelerate.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["CrossEntropyDistiller", "Distiller", "TrainConfig", "TrainResult", "freeze", "train", "unwrap"]

_HOMES = {
    "CrossEntropyDistiller": "distiller",
    "Distiller": "distiller",
    "freeze": "distiller",
    "TrainConfig": "settings",
    "TrainResult": "trainer",
    "train": "trainer",
    "unwrap": "trainer",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kdkit.engine' has no attribute {name!r}")
    return getattr(import_module(f"kdkit.engine.{home}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
