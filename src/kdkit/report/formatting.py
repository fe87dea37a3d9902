"""How a metric is shown in a table: the unit and format are inferred from the key's name."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

MISSING = "—"

# Fractions shown as percentages. Matched as whole words of the key ("token_agreement", "val_acc").
PERCENT_WORDS = {"accuracy", "acc", "agreement", "ece", "top1", "top5", "f1", "precision", "recall", "match"}

HEADERS = {
    "model": "Model",
    "accuracy": "Accuracy",
    "agreement": "Agreement with teacher",
    "token_agreement": "Token agreement",
    "ece": "ECE",
    "nll": "NLL (nats)",
    "kl_to_teacher": "KL(T‖S) (nats)",
    "parameters": "Parameters",
    "size_on_disk_bytes": "Size on disk",
    "latency_ms_median": "Latency (median)",
    "latency_ms_p90": "Latency (p90)",
    "latency_ms_per_example": "Latency / example",
    "perplexity": "Perplexity",
    "examples": "Examples",
}

# Which direction is better, matched on the key's last word, for highlighting the best value of a
# column. Keys not listed (e.g. parameters, where smaller is a trade-off rather than a win) are never
# highlighted.
HIGHER_IS_BETTER = {"accuracy", "acc", "agreement", "f1", "top1", "top5"}
LOWER_IS_BETTER = {"ece", "nll", "teacher", "perplexity", "ppl", "loss", "kl"}


def _words(key: str) -> list[str]:
    return key.lower().replace("-", "_").split("_")


def header(key: str) -> str:
    """A readable column header for a metric key ("kl_to_teacher" -> "KL(T‖S) (nats)")."""
    if key in HEADERS:
        return HEADERS[key]
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def is_number(value: Any) -> bool:
    """True for real, finite-or-not numbers (not bools, which are shown as yes/no)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_percent(key: str) -> bool:
    """True if the key names a fraction that reads best as a percentage."""
    return bool(PERCENT_WORDS & set(_words(key)))


def format_value(key: str, value: Any) -> str:
    """Format one cell. None, NaN and missing values become "—"; the rest by the key's name:
    percentages for accuracy/agreement/ece, thousands separators for parameters and integers,
    MB for sizes in bytes, ms for latencies, 4 significant digits otherwise.
    """
    if value is None or (is_number(value) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if not is_number(value):
        return str(value)
    words = _words(key)
    if is_percent(key) and abs(value) <= 1.0:
        return f"{100 * value:.2f}%"
    if "bytes" in words or "size" in words:
        return f"{value / 1e6:,.2f} MB"
    if "mb" in words:
        return f"{value:,.2f} MB"
    if "ms" in words or "latency" in words:
        return f"{value:,.3g} ms" if abs(value) < 10 else f"{value:,.1f} ms"
    if "params" in words or "parameters" in words or "tokens" in words or "examples" in words:
        return f"{int(round(value)):,}"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def infer_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, header) for every scalar field of the rows, "model" first, in order of first appearance."""
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            scalar = value is None or isinstance(value, (str, bool)) or is_number(value)
            if scalar and key not in keys:
                keys.append(key)
    if "model" in keys:
        keys.remove("model")
        keys.insert(0, "model")
    return [(key, header(key)) for key in keys]


def best_row(rows: Sequence[dict[str, Any]], key: str) -> int | None:
    """Index of the best row for a metric whose direction is known; None if unknown or < 2 values."""
    last = _words(key)[-1]
    if last in HIGHER_IS_BETTER or key.startswith("exact_match"):  # exact_match, exact_match_d3
        sign = 1.0
    elif last in LOWER_IS_BETTER and (last != "teacher" or key.startswith("kl")):
        sign = -1.0
    else:
        return None
    scored = [
        (sign * row[key], -i)
        for i, row in enumerate(rows)
        if is_number(row.get(key)) and not math.isnan(row[key])
    ]
    if len(scored) < 2:
        return None
    return -max(scored)[1]
