"""One student of a run as a config writes it: `{name, method, ...the method's parameters}`.

The parameters are checked against the method's own `Params` model (and, for a divergence, against
what that divergence declares) when the config is loaded, before any model is built: `beta: 1.5`,
`bta: 0.5` or an unknown method is refused with one line naming the field and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from pydantic import Field, field_validator, model_validator

from kdkit.settings import StrictModel
from kdkit.specs import method_of_kind


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


class StudentRun(StrictModel):
    """Base of a run's student entries. Fields other than those declared here are the method's
    parameters; unset ones keep the method's defaults (`kdkit methods` lists them)."""

    kind: ClassVar[str] = "?"
    model_config = StrictModel.model_config | {"extra": "allow"}

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    method: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        if value is not None:
            method_of_kind(value, cls.kind)  # ConfigError (a ValueError) lists the methods of this kind
        return value

    @model_validator(mode="after")
    def _valid_params(self) -> StudentRun:
        if self.method is None:
            if self.model_extra:
                key = next(iter(self.model_extra))
                raise ValueError(f"{key!r} is a method parameter, but student {self.name!r} names no method")
            return self
        # The method's own ValidationError keeps the field's location in the message.
        self.method_params()
        return self

    def method_class(self) -> Any:
        return None if self.method is None else method_of_kind(self.method, self.kind)

    def method_params(self) -> Any:
        """The method's validated `Params` (defaults filled in), or None without a method."""
        method = self.method_class()
        return None if method is None else method.params(dict(self.model_extra or {}))


__all__ = ["StudentRun", "unique_student_names"]
