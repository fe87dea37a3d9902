"""Reading the training history that the engine writes: one JSON object per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Fields of a history line that describe the run rather than a loss or metric term.
NON_TERMS = frozenset({"step", "lr", "elapsed_s", "examples_per_s", "epoch", "time", "timestamp"})


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order. Blank lines and a truncated last line (a run
    killed mid-write) are skipped rather than failing the whole report."""
    records: list[dict[str, Any]] = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """Names of the numeric fields worth plotting (everything but step, lr, timing), in first-seen order."""
    terms: list[str] = []
    for record in records:
        for key, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and key not in NON_TERMS and key not in terms:
                terms.append(key)
    return terms
