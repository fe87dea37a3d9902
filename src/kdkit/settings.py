"""The base of every validated settings model, and the error a person must fix in a config.

Pydantic and the standard library only: the engine, methods, samplers and configs all build their
settings on `StrictModel`, so this module sits below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError


class ConfigError(ValueError):
    """A config a person must fix; the message is a single line naming the field."""


class StrictModel(BaseModel):
    """Base of every kdkit config section: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def field_error(model: str, key: str, message: str, value: Any) -> ValidationError:
    """A ValidationError located at field `key` (so a config error names `students.0.beta`),
    for validators that check keys pydantic does not know as fields."""
    error = PydanticCustomError("value_error", message.replace("{", "{{").replace("}", "}}"))
    return ValidationError.from_exception_data(model, [InitErrorDetails(type=error, loc=(key,), input=value)])


class ParamsModel(StrictModel):
    """Base of the `Params` of registered entries and methods (flat, as a config writes them).

    A field may hold the parameters of another registry's entry: `nested_params` maps such a field
    to (the field naming the entry, the registry), e.g. {"divergence_params": ("divergence",
    DIVERGENCES)}; flat keys that the chosen entry declares (`beta: 0.3`) are moved into it. An
    unknown key is refused with a message naming it and every parameter that is allowed.
    """

    nested_params: ClassVar[dict[str, tuple[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        allowed = set(cls.model_fields)
        for field, (selector, registry) in cls.nested_params.items():
            chosen = data.get(selector, cls.model_fields[selector].default)
            if not isinstance(chosen, str) or chosen not in registry:
                continue  # the selector's own validation reports it
            declared = set(registry.params(chosen))
            moved = {
                key: data.pop(key) for key in list(data) if key in declared and key not in cls.model_fields
            }
            data[field] = {**(data.get(field) or {}), **moved}
            allowed |= declared
        unknown = [key for key in data if key not in allowed]
        if unknown:
            shown = ", ".join(sorted(allowed - set(cls.nested_params)))
            message = f"{unknown[0]!r} is not a parameter here (allowed: {shown})"
            raise field_error(cls.__name__, unknown[0], message, data[unknown[0]])
        return data


class NoParams(ParamsModel):
    """The parameters of a registered entry that takes none."""


@dataclass(frozen=True)
class LMContext:
    """What builders of LM samplers, teacher signals and objectives get besides their own parameters.

    eos_token_ids: every id that ends a completion (chat models often have several).
    seed: a private RNG seed for samplers that draw coins; None uses Python's global `random`,
    which the engine seeds from `TrainConfig.seed` and restores on resume.
    """

    tokenizer: Any = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int | None = None

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, *, extra_eos: tuple[int, ...] = (), seed: int | None = None
    ) -> LMContext:
        """The context of a tokenizer: its EOS id plus `extra_eos` (e.g. a generation config's list)."""
        eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
        eos += [i for i in extra_eos if i not in eos]
        return cls(tokenizer, tuple(int(i) for i in eos), getattr(tokenizer, "pad_token_id", None), seed)


__all__ = ["ConfigError", "LMContext", "NoParams", "ParamsModel", "StrictModel", "field_error"]
