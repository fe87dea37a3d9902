"""Entries as a config writes them, validated through the registries alone (no implementations are
imported here, so configs stay light): a weighted objective term, and method lookup by kind."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from kdkit.registry import METHODS, OBJECTIVES, load_builtins
from kdkit.settings import ConfigError, StrictModel


class ObjectiveSpec(StrictModel):
    """One weighted term: `{name: kd, weight: 1.0, temperature: 4}`; other fields are the term's
    params, validated against its `Params` model (errors are located at the field)."""

    model_config = StrictModel.model_config | {"extra": "allow"}

    name: str
    weight: float = Field(1.0, ge=0.0)

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        return OBJECTIVES.canonical(value)  # UnknownNameError is a ValueError naming the known ones

    @model_validator(mode="after")
    def _valid_params(self) -> ObjectiveSpec:
        # Raising the params model's own ValidationError here keeps its locations, so an error
        # reads `objectives.0.temperature: Input should be a valid number`.
        OBJECTIVES.get(self.name).Params.model_validate(self.model_extra or {})
        return self

    def params(self) -> StrictModel:
        return OBJECTIVES.get(self.name).Params.model_validate(self.model_extra or {})


def method_of_kind(name: str, kind: str) -> Any:
    """The method class registered as `name`, checked to be of `kind` ("classifier" or "lm");
    ConfigError listing the methods of that kind otherwise."""
    load_builtins()
    known = ", ".join(methods_of_kind(kind))
    noun = {"lm": "language-model", "classifier": "classifier", "text": "black-box text"}.get(kind, kind)
    method = METHODS.get(name) if name in METHODS else None
    if getattr(method, "kind", None) != kind:
        raise ConfigError(f"{name!r} is not a {noun} method (known: {known})")
    return method


def methods_of_kind(kind: str) -> list[str]:
    load_builtins()
    return [name for name, _, method in METHODS.items() if getattr(method, "kind", None) == kind]


__all__ = ["ObjectiveSpec", "method_of_kind", "methods_of_kind"]
