"""kdkit: knowledge distillation for classifiers, encoders and language models.

`kdkit.distill(teacher=..., student=..., data=...)` and `kdkit.evaluate(models, data)` are the
Python front door (defined in `kdkit.front_door`, imported on first use so `import kdkit` stays
light; the module is not named `distill` so that the function is never shadowed by a submodule).
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {"distill": "kdkit.front_door", "evaluate": "kdkit.front_door",
         "DistillResult": "kdkit.front_door", "EvaluationResult": "kdkit.front_door"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
