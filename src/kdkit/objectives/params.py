"""Parameters shared by objectives of both kinds: the choice of a divergence and its own parameters."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from kdkit.losses import DIVERGENCES
from kdkit.settings import ParamsModel, field_error


class DivergenceChoice(ParamsModel):
    """`divergence` names an entry of `DIVERGENCES`; its own parameters (beta, alpha, f) are written
    flat beside it (`divergence: jsd, beta: 0.3`) and checked against what that entry declares,
    with its declared defaults filled in (`divergence_params`)."""

    nested_params: ClassVar[dict[str, tuple[str, Any]]] = {"divergence_params": ("divergence", DIVERGENCES)}

    divergence: str = "fkl"
    divergence_params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("divergence")
    @classmethod
    def _known_divergence(cls, value: str) -> str:
        return DIVERGENCES.canonical(value)  # UnknownNameError is a ValueError naming the known ones

    @model_validator(mode="after")
    def _divergence_params(self) -> DivergenceChoice:
        for key, value in self.divergence_params.items():
            try:
                DIVERGENCES.check_params(self.divergence, {key: value})
            except ValueError as error:
                raise field_error(type(self).__name__, key, str(error), value) from None
        # __dict__: validate_assignment would re-run this validator on a plain assignment
        self.__dict__["divergence_params"] = DIVERGENCES.check_params(self.divergence, self.divergence_params)
        return self


__all__ = ["DivergenceChoice"]
