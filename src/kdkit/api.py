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
    "text": "kdkit.pipelines.text:run_text",
}
EVALUATORS: dict[str, str] = {
    "classifier": "kdkit.pipelines.classifier:evaluate_classifier_run",
    "lm": "kdkit.pipelines.lm:evaluate_lm_run",
    "text": "kdkit.pipelines.text:evaluate_text_run",
}


def _resolve(table: dict[str, str], kind: str):
    module_name, function_name = table[kind].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def run_config(cfg: BaseModel, *, resume: bool = False, output_dir: Path | None = None) -> Path:
    """Run an already validated config; returns the run folder holding the report."""
    target = getattr(cfg, "PIPELINE", None)  # a config class may name its own pipeline
    pipeline = _resolve({"own": target} if target else PIPELINES, "own" if target else cfg.kind)  # type: ignore[attr-defined]
    return pipeline(cfg, resume=resume, run_dir=output_dir)


def run(
    config_path: str | Path,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
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
    saved = json.loads(config_file.read_text())
    from kdkit.config.any_model import is_any_model_config

    if saved.get("kind") == "classifier" and is_any_model_config(saved):  # models/data named by source
        return _resolve({"own": "kdkit.pipelines.any_model:evaluate_any_model_run"}, "own")(run_dir)
    return _resolve(EVALUATORS, saved["kind"])(run_dir)


def cache(
    config_path: str | Path, overrides: list[str] | None = None, *, only: list[str] | None = None
) -> dict:
    """Build an LM run config's teacher-logit caches (`caches:`; all, or `only` these names).

    Resumable and parallel: see `kdkit.pipelines.cache.run_cache`. Returns {name: CacheSummary}.
    """
    from kdkit.config import ConfigError
    from kdkit.pipelines.cache import run_cache

    cfg = load_run_config(config_path, overrides)
    if getattr(cfg, "kind", None) != "lm":
        raise ConfigError(f"kdkit cache works on LM run configs (kind: lm), got kind {cfg.kind!r}")
    return run_cache(cfg, only=only)


def describe_registries() -> str:
    """Every registered method (of every kind, with its parameters and defaults), sampler, teacher
    signal, objective and divergence, each with its one-line description."""
    from kdkit.losses import DIVERGENCES
    from kdkit.registry import (
        LM_OBJECTIVES,
        METHODS,
        OBJECTIVES,
        REWARDS,
        SAMPLERS,
        TEACHER_SIGNALS,
        load_builtins,
    )

    load_builtins()
    lines: list[str] = []
    sections = (
        ("methods", METHODS),
        ("samplers", SAMPLERS),
        ("teacher signals", TEACHER_SIGNALS),
        ("LM objectives", LM_OBJECTIVES),
        ("classifier objectives", OBJECTIVES),
        ("rewards", REWARDS),
        ("divergences", DIVERGENCES),
    )
    for title, registry in sections:
        if not len(registry):
            continue
        lines.append(f"{title}:")
        width = max(len(name) for name in registry.names())
        for name, description, entry in registry.items():
            kind = getattr(entry, "kind", None)
            lines.append(f"  {name:<{width}}  {f'[{kind}] ' if kind else ''}{description}")
            params = _parameters(registry, name, entry)
            if params:
                lines.append(f"  {'':<{width}}    {params}")
    return "\n".join(lines)


def _parameters(registry: object, name: str, entry: object) -> str:
    """ "key=default, …" of an entry's `Params` model or of a divergence's declared parameters."""
    model = getattr(entry, "Params", None)
    if model is not None:
        defaults = model.model_validate({}).model_dump()
        for nested in getattr(model, "nested_params", {}):
            defaults |= defaults.pop(nested)  # e.g. jsd's beta beside `divergence`
        return ", ".join(f"{key}={value!r}" for key, value in defaults.items())
    declared = registry.params(name) if hasattr(registry, "params") else {}  # type: ignore[attr-defined]
    return ", ".join(f"{key}={spec.default!r}" for key, spec in declared.items())


def limit(model: str, texts: Path, widths: list[int], **options: object) -> object:
    """The minimum-width predictor (`kdkit limit`): see `kdkit.diagnostics.limit.run_limit`."""
    from kdkit.diagnostics.limit import run_limit

    return run_limit(model, texts, widths, **options)  # type: ignore[arg-type]
