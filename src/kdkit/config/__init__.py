"""Validated run configs: YAML + `key.sub=value` overrides -> pydantic models.

Errors are `ConfigError`s whose message is one line naming the field, e.g.
`config error at objectives.0.name: 'kdd' is not a objective (known: kd, dkd, ...)`.
"""

from __future__ import annotations

from kdkit.config.loading import ConfigError, apply_overrides, load_yaml, validation_message
from kdkit.config.train import StrictModel, TrainConfig

__all__ = ["ConfigError", "StrictModel", "TrainConfig", "apply_overrides", "load_yaml", "validation_message"]
