"""Validated run configs: YAML + `key.sub=value` overrides -> pydantic models.

Errors are one line naming the field, e.g.
`config error at students.0.objectives.0.name: 'kdd' is not an objective (known: ce, kd, ...)`.
"""

from __future__ import annotations

from kdkit.config.loading import ConfigError, apply_overrides, load_yaml, validation_message
from kdkit.config.runs import RUN_KINDS, load_run_config, parse_run_config
from kdkit.config.train import StrictModel, TrainConfig

__all__ = [
    "RUN_KINDS",
    "ConfigError",
    "StrictModel",
    "TrainConfig",
    "apply_overrides",
    "load_run_config",
    "load_yaml",
    "parse_run_config",
    "validation_message",
]
