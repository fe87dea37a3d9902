"""Run folders shared by every pipeline: `output_dir/name/<UTC stamp>/`, marked by config.json."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def resolve_run_dir(output_dir: str | Path, name: str, *, resume: bool, run_dir: str | Path | None) -> Path:
    """The folder a run writes to.

    An explicit `run_dir` wins; with `resume`, the latest folder under `output_dir/name` that holds
    a config.json; otherwise a new `output_dir/name/<YYYYmmdd-HHMMSS>` (suffixed if taken).
    """
    if run_dir is not None:
        return Path(run_dir)
    parent = Path(output_dir) / name
    if resume and parent.is_dir():
        previous = sorted(p for p in parent.glob("*") if (p / "config.json").is_file())
        if previous:
            return previous[-1]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = parent / stamp
    suffix = 1
    while path.exists():  # two runs started within the same second
        suffix += 1
        path = parent / f"{stamp}-{suffix}"
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's content, or {} when it does not exist (e.g. a student not trained yet)."""
    return json.loads(path.read_text()) if path.is_file() else {}
