"""The two things every settings model in kdkit shares, at the bottom of the layers.

`StrictModel` is the base of every validated settings section (engine, config, method parameters);
`ConfigError` is the one exception a person fixes by editing a config. Both live here, below the
engine and the config loader, so that either can use them without importing the other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config a person must fix; the message is a single line naming the field."""


class StrictModel(BaseModel):
    """Base of every kdkit settings section: unknown fields are errors, not silently ignored, and
    assignments are validated like construction."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
