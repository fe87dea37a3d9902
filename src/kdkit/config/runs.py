"""Resolving a run config's `kind:` to its pydantic model and validating it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from kdkit.config.loading import ConfigError, apply_overrides, load_yaml

# kind -> "module:Class"; imported lazily so `kind: lm` does not import vision code and vice versa.
RUN_KINDS: dict[str, str] = {
    "classifier": "kdkit.config.classifier:ClassifierRunConfig",
    "lm": "kdkit.config.lm:LMRunConfig",
    "text": "kdkit.config.text:TextRunConfig",
}


def run_config_class(kind: object) -> type[BaseModel]:
    if not isinstance(kind, str) or kind not in RUN_KINDS:
        known = ", ".join(RUN_KINDS)
        if kind is None:
            raise ConfigError(f"config error at kind: required field is missing (one of: {known})")
        raise ConfigError(f"config error at kind: {kind!r} is not a kind of run (known: {known})")
    module_name, class_name = RUN_KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_run_config(data: dict[str, Any]) -> BaseModel:
    """Validate a config mapping; raises pydantic.ValidationError or ConfigError."""
    if data.get("kind") == "classifier":
        from kdkit.config.any_model import AnyModelRunConfig, is_any_model_config

        if is_any_model_config(data):  # models and data named by source / files
            return AnyModelRunConfig.model_validate(data)
    return run_config_class(data.get("kind")).model_validate(data)


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> BaseModel:
    """YAML file + `key.sub=value` overrides -> validated run config."""
    return parse_run_config(apply_overrides(load_yaml(path), overrides or []))
