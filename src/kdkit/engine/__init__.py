"""The training engine: the `Distiller` contract and one Accelerate loop for every method.

`train` is imported lazily so that methods importing `kdkit.engine.distiller` do not pay for
Accelerate at import time.
"""

from __future__ import annotations

from typing import Any

from kdkit.engine.distiller import CrossEntropyDistiller, Distiller, freeze

__all__ = ["CrossEntropyDistiller", "Distiller", "TrainResult", "freeze", "train", "unwrap"]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult", "unwrap"):
        from kdkit.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'kdkit.engine' has no attribute {name!r}")
