"""What a report says, independent of its format: the Markdown and HTML renderers both read this."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Plot:
    """A figure of the report: `path` is relative to the run folder."""

    key: str
    title: str
    caption: str
    path: Path


@dataclass
class ReportContent:
    title: str
    created: str  # ISO 8601, UTC
    rows: list[dict[str, Any]]
    columns: list[tuple[str, str]]
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config_yaml: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)
