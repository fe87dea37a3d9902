"""The Python API behind the CLI: run a config, the demo, re-evaluate a run, list registries.

    import kdkit.api as kd
    run_dir = kd.run("configs/fashion_mnist_benchmark.yaml", ["train.steps=500"])
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pydantic import BaseModel

from kdkit.config import load_run_config

DEMO_CONFIG = Path(__file__).parent / "configs" / "fashion_mnist_demo.yaml"

# kind -> "module:function(cfg, *, resume, run_dir) -> Path"
PIPELINES: dict[str, str] = {
    "classifier": "kdkit.pipelines.classifier:run_classifier",
    "lm": "kdkit.pipelines.lm:run_lm",
}
EVALUATORS: dict[str, str] = {
    "classifier": "kdkit.pipelines.classifier:evaluate_classifier_run",
    "lm": "kdkit.pipelines.lm:evaluate_lm_run",
}

# Modules whose import registers methods, objectives and divergences.
BUILTIN_MODULES = ("kdkit.losses", "kdkit.methods.classifier", "kdkit.methods.lm")


def _resolve(table: dict[str, str], kind: str):
    module_name, function_name = table[kind].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def run_config(cfg: BaseModel, *, resume: bool = False, output_dir: Path | None = None) -> Path:
    """Run an already validated config; returns the run folder holding the report."""
    pipeline = _resolve(PIPELINES, cfg.kind)  # type: ignore[attr-defined]
    return pipeline(cfg, resume=resume, run_dir=output_dir)


def run(
    config_path: str | Path, overrides: list[str] | None = None, *, resume: bool = False,
    output_dir: Path | None = None,
) -> Path:
    """Validate the YAML config (+ overrides) before any work, then run it."""
    return run_config(load_run_config(config_path, overrides), resume=resume, output_dir=output_dir)


def demo(overrides: list[str] | None = None, *, resume: bool = False, output_dir: Path | None = None) -> Path:
    """The README's main command: Fashion-MNIST teacher → scratch / KD / DKD students → report."""
    return run(DEMO_CONFIG, overrides, resume=resume, output_dir=output_dir)


def evaluate(run_dir: Path) -> Path:
    """Re-evaluate a finished run folder (its saved config says which kind) and rewrite the report."""
    import json

    config_file = run_dir / "config.json"
    if not config_file.is_file():
        from kdkit.config import ConfigError

        raise ConfigError(f"{run_dir} is not a kdkit run folder (no config.json)")
    kind = json.loads(config_file.read_text())["kind"]
    return _resolve(EVALUATORS, kind)(run_dir)


def describe_registries() -> str:
    """Every registered method, objective and divergence with its one-line description."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    from kdkit.losses import DIVERGENCES
    from kdkit.registry import METHODS, OBJECTIVES

    lines: list[str] = []
    for title, registry in (("methods", METHODS), ("objectives", OBJECTIVES), ("divergences", DIVERGENCES)):
        lines.append(f"{title}:")
        width = max((len(name) for name in registry.names()), default=0)
        lines.extend(f"  {name:<{width}}  {description}" for name, description, _ in registry.items())
    return "\n".join(lines)
