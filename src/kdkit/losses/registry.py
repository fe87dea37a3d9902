"""A name -> object registry that a YAML config can refer to.

Standard library only: `kdkit.losses` must import nothing else of kdkit, and every other
registry in kdkit (methods, objectives, models) reuses this class through `kdkit.registry`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_NO_DEFAULT: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """A declared keyword parameter of a registered entry (e.g. a divergence's `beta`).

    The default is read from the entry's own signature when not given, so it is written once.
    `low`/`high` bound numbers (inclusive); `choices` restricts strings.
    """

    description: str = ""
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    default: Any = _NO_DEFAULT

    def check(self, name: str, value: Any) -> Any:
        """`value` if it is allowed, else ValueError naming `name` and what is allowed."""
        if self.choices is not None:
            if value not in self.choices and not callable(value):
                raise ValueError(
                    f"{name}={value!r} is not allowed (choose one of: {', '.join(self.choices)})"
                )
            return value
        if self.low is not None or self.high is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            low = -float("inf") if self.low is None else self.low
            high = float("inf") if self.high is None else self.high
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is outside [{low:g}, {high:g}]")
        return value


class UnknownNameError(KeyError, ValueError):
    """Raised by `Registry.get` for a name nobody registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names (and aliases) to objects, each with a one-line description.

    >>> DIVERGENCES = Registry("divergence")
    >>> @DIVERGENCES.register("rkl", "reverse KL: mode-seeking")
    ... def reverse_kl(...): ...
    >>> DIVERGENCES.get("rkll")   # UnknownNameError: 'rkll' is not a divergence (known: rkl)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[T, str]] = {}
        self._aliases: dict[str, str] = {}
        self._params: dict[str, dict[str, Param]] = {}

    def register(
        self,
        name: str,
        description: str,
        *,
        aliases: tuple[str, ...] = (),
        params: Mapping[str, Param] | None = None,
    ) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, description, aliases=aliases, params=params)
            return obj

        return decorator

    def add(
        self,
        name: str,
        obj: T,
        description: str,
        *,
        aliases: tuple[str, ...] = (),
        params: Mapping[str, Param] | None = None,
    ) -> None:
        """Register `obj`; `params` declares its keyword parameters (defaults read from its signature)."""
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        declared = {key: _with_default(obj, key, spec) for key, spec in (params or {}).items()}
        self._entries[name] = (obj, description)
        for alias in aliases:
            self._aliases[alias] = name
        self._params[name] = declared

    def params(self, name: str) -> dict[str, Param]:
        """The declared parameters of `name` (empty when it takes none)."""
        return dict(self._params[self.canonical(name)])

    def check_params(self, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Validate keyword parameters for entry `name`: unknown keys and out-of-range values raise
        ValueError naming the key and what is allowed. Returns the declared defaults updated by `given`."""
        declared = self.params(name)
        unknown = sorted(set(given) - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            raise ValueError(
                f"{unknown[0]!r} is not a parameter of {self.kind} {self.canonical(name)!r} "
                f"(its parameters: {known})"
            )
        values = {key: spec.default for key, spec in declared.items() if spec.default is not _NO_DEFAULT}
        for key, value in given.items():
            values[key] = declared[key].check(key, value)
        return values

    def canonical(self, name: str) -> str:
        """The registered name behind `name` (resolving aliases); raises UnknownNameError."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        article = "an" if self.kind[:1] in "aeiou" else "a"
        raise UnknownNameError(f"{name!r} is not {article} {self.kind} (known: {', '.join(self.names())})")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)][0]

    def describe(self, name: str) -> str:
        return self._entries[self.canonical(name)][1]

    def names(self) -> list[str]:
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, str, T]]:
        """(name, description, object) for every entry, in registration order."""
        for name, (obj, description) in self._entries.items():
            yield name, description, obj

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _with_default(obj: Any, key: str, spec: Param) -> Param:
    if spec.default is not _NO_DEFAULT or not callable(obj):
        return spec
    try:
        parameter = inspect.signature(obj).parameters.get(key)
    except (TypeError, ValueError):
        return spec
    if parameter is None:
        raise ValueError(f"declared parameter {key!r} is not an argument of {obj!r}")
    return replace(spec, default=parameter.default)


__all__ = ["Param", "Registry", "UnknownNameError"]
