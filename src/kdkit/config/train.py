"""The engine's `TrainConfig` (defined in `kdkit.engine.settings`), re-exported for run configs."""

from __future__ import annotations

from kdkit.config.students import unique_student_names
from kdkit.engine.settings import TrainConfig
from kdkit.settings import StrictModel

__all__ = ["StrictModel", "TrainConfig", "unique_student_names"]
