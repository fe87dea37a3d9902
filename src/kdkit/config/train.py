"""What every run config shares: the engine's `TrainConfig` (defined in `kdkit.engine.settings`,
re-exported here) and the check that student names are unique."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from kdkit.engine.settings import TrainConfig
from kdkit.settings import StrictModel

__all__ = ["StrictModel", "TrainConfig", "unique_student_names"]


class _Named(Protocol):
    name: str


NamedT = TypeVar("NamedT", bound=_Named)


def unique_student_names(students: Sequence[NamedT]) -> Sequence[NamedT]:
    """Validator of a run's `students:` list: each student's folder is named after it."""
    names = [student.name for student in students]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"student names must be unique; repeated: {', '.join(duplicates)}")
    return students
