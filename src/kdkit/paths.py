"""Where kdkit keeps things that must not go into git: caches (teachers, converted models, data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$KDKIT_CACHE` (default `~/.cache/kdkit`) joined with `parts`, created on demand."""
    root = Path(os.environ.get("KDKIT_CACHE", Path.home() / ".cache" / "kdkit")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
