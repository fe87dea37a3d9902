"""Capture intermediate outputs of any model by module name, so user models need no changes."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn


class FeatureHooks:
    """Forward hooks on the named submodules of `model`; after a forward pass, `features[name]`
    holds that module's output (a tensor, e.g. [B, C, H, W] for a conv stage).

    Names are those of `model.named_modules()` ("stage2", "features.3", "encoder.layer.1").
    A wrong name raises `KeyError` listing the names that exist. Use as a context manager, or call
    `remove()` when done; `clear()` drops captured tensors (they hold the autograd graph).

    >>> with FeatureHooks(student, ["stage2"]) as hooks:
    ...     logits = student(x)
    ...     hint = hooks.features["stage2"]
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.names = list(dict.fromkeys(names))  # unique, in order
        modules = dict(model.named_modules())
        missing = [name for name in self.names if name not in modules or name == ""]
        if missing:
            available = [name for name in modules if name]
            raise KeyError(
                f"{type(model).__name__} has no module named {missing[0]!r} "
                f"(available: {', '.join(available) or 'none'})"
            )
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]

    def _hook(self, name: str) -> Any:
        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            # Modules returning tuples (e.g. attention layers) contribute their first element.
            self.features[name] = output[0] if isinstance(output, (tuple, list)) else output

        return capture

    def get(self, name: str) -> torch.Tensor:
        """The output captured for `name` by the last forward pass; clear error if none ran."""
        if name not in self.features:
            raise RuntimeError(f"no output captured for {name!r}: run the model's forward first")
        return self.features[name]

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.remove()


__all__ = ["FeatureHooks"]
