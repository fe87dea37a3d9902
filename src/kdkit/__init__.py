"""kdkit: knowledge distillation for classifiers, encoders and language models.

`kdkit.distill(teacher=..., student=..., data=...)` and `kdkit.evaluate(models, data)` are the
Python front door (defined in `kdkit.pipelines.distill`, imported on first use so `import kdkit`
stays light; a top-level module named `distill` would shadow the function once imported).
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {"distill": "kdkit.pipelines.distill", "evaluate": "kdkit.pipelines.distill",
         "DistillResult": "kdkit.pipelines.distill", "EvaluationResult": "kdkit.pipelines.distill"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
