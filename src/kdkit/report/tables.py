"""Plain-text tables of a run's headline numbers, for the terminal (rows as in metrics.json)."""

from __future__ import annotations

import math
from typing import Any

#: The report columns of a classifier run (key in a metrics row, header).
CLASSIFIER_COLUMNS = [
    ("model", "Model"),
    ("method", "Method"),
    ("accuracy", "Accuracy"),
    ("agreement", "Agreement with teacher"),
    ("kl_to_teacher", "KL(T‖S) (nats)"),
    ("ece", "ECE"),
    ("parameters", "Parameters"),
    ("size_on_disk_bytes", "Size on disk"),
    ("latency_ms_per_example", "Latency / example"),
    ("train_time_s", "Train time (s)"),
]


def exact_keys(rows: list[dict[str, Any]]) -> list[str]:
    """exact_match_d<k> keys present in any row, by k."""
    keys = {k for row in rows for k in row if k.startswith("exact_match_d")}
    return sorted(keys, key=lambda k: int(k.removeprefix("exact_match_d")))


def classifier_results_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the headline numbers, for the terminal."""
    lines = [
        f"{'model':<14} {'method':<14} {'accuracy':>9} {'agree':>7} {'KL(T‖S)':>8} {'ECE':>6} {'params':>9}"
    ]
    for row in rows:
        lines.append(
            f"{row['model']:<14} {row['method'][:14]:<14} {row['accuracy']:>9.2%} {row['agreement']:>7.2%} "
            f"{row['kl_to_teacher']:>8.4f} {row['ece']:>6.2%} {row['parameters']:>9,}"
        )
    return "\n".join(lines)


def lm_results_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the headline numbers, for the terminal."""
    exact = exact_keys(rows)
    header = (
        f"{'model':<16} {'ppl':>9} {'agree':>7} {'logp_T':>8} {'KL(S‖T)':>8} {'params':>12} {'time s':>7}"
    )
    header += "".join(f" {'EM' + k.removeprefix('exact_match_d'):>6}" for k in exact)
    lines = [header]

    def number(value: Any, spec: str, width: int) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return f"{'—':>{width}}"
        return f"{value:>{width}{spec}}"

    for row in rows:
        line = (
            f"{row['model'][:16]:<16} {number(row.get('perplexity'), '.3f', 9)} "
            f"{number(row.get('agreement'), '.2%', 7)} {number(row.get('teacher_logp'), '.3f', 8)} "
            f"{number(row.get('rkl_estimate'), '.3f', 8)} {number(row.get('parameters'), ',', 12)} "
            f"{number(row.get('train_time_s'), '.0f', 7)}"
        )
        line += "".join(f" {number(row.get(k), '.0%', 6)}" for k in exact)
        lines.append(line)
    return "\n".join(lines)


__all__ = ["CLASSIFIER_COLUMNS", "classifier_results_table", "exact_keys", "lm_results_table"]
