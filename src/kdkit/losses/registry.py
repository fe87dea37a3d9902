"""A name -> object registry that a YAML config can refer to.

Standard library only: `kdkit.losses` must import nothing else of kdkit, and every other
registry in kdkit (methods, objectives, models) reuses this class through `kdkit.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


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

    def register(self, name: str, description: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, description, aliases=aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T, description: str, *, aliases: tuple[str, ...] = ()) -> None:
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._entries[name] = (obj, description)
        for alias in aliases:
            self._aliases[alias] = name

    def canonical(self, name: str) -> str:
        """The registered name behind `name` (resolving aliases); raises UnknownNameError."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownNameError(f"{name!r} is not a {self.kind} (known: {', '.join(self.names())})")

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


__all__ = ["Registry", "UnknownNameError"]
