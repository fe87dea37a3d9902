"""The report's figures as PNG files: training curves, accuracy vs size, reliability diagrams.

Figures are built with matplotlib's object API and rendered by Agg directly, so nothing touches
pyplot's global state or needs a display, and figures are freed as soon as they are saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter

from kdkit.report.formatting import header, is_number, is_percent
from kdkit.report.history import loss_terms

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
DPI = 110


def model_colors(*groups: Sequence[str]) -> dict[str, str]:
    """One colour per model name, in first-seen order, so a model looks the same in every figure."""
    names = list(dict.fromkeys(name for group in groups for name in group))
    return {name: COLORS[i % len(COLORS)] for i, name in enumerate(names)}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def _style(ax: Any) -> None:
    ax.grid(True, which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _grid(n: int, width: float = 4.2, height: float = 3.2, max_cols: int = 3) -> tuple[Figure, list]:
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _human(value: float, _position: object = None) -> str:
    """Tick label for counts: 45k, 1.2M, 3B (scientific labels crowd a log axis under one decade)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _spans_decades(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) >= 50


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average; noisy per-step losses hide their trend otherwise."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def training_curves(
    histories: Mapping[str, list[dict[str, Any]]], path: Path, colors: Mapping[str, str] | None = None
) -> Path | None:
    """One subplot per loss term, one line per model, x = step. Returns None if nothing to plot.

    histories: model name -> records of its metrics.jsonl. Records lacking a term (e.g. eval
    metrics logged every N steps) are skipped for that term. Log-y where a term spans decades.
    """
    terms: list[str] = []
    for records in histories.values():
        terms += [t for t in loss_terms(records) if t not in terms]
    if not terms:
        return None
    colors = {**model_colors(list(histories)), **(colors or {})}
    fig, axes = _grid(len(terms))
    for ax, term in zip(axes, terms):
        plotted: list[float] = []
        for model, records in histories.items():
            color = colors[model]
            points = [
                (r.get("step", i), r[term])
                for i, r in enumerate(records)
                if is_number(r.get(term)) and math.isfinite(r[term])
            ]
            if not points:
                continue
            steps, values = zip(*points)
            plotted += values
            if len(values) > 50:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(
                    steps,
                    _smooth(list(values), max(5, len(values) // 25)),
                    color=color,
                    linewidth=1.6,
                    label=model,
                )
            else:
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linewidth=1.6,
                    marker="." if len(values) < 20 else None,
                    label=model,
                )
        if _spans_decades(plotted):
            ax.set_yscale("log")
        ax.set_title(term, fontsize=10)  # the name as logged, so it can be found in metrics.jsonl
        ax.set_xlabel("step")
        _style(ax)
    if len(histories) > 1:  # one legend for all panels, below them, so it never hides a curve
        by_label = {}  # a model may be missing from some panels: gather its line from any of them
        for ax in axes:
            by_label.update(zip(*reversed(ax.get_legend_handles_labels())))
        fig.legend(
            list(by_label.values()),
            list(by_label),
            loc="outside lower center",
            ncols=min(len(by_label), 6),
            fontsize=8,
            frameon=False,
        )
    return _save(fig, path)


def scatter(
    rows: Sequence[dict[str, Any]], x: str, y: str, path: Path, colors: Mapping[str, str] | None = None
) -> Path | None:
    """y against x (log-x when x is positive), one labelled point per row. None if no row has both."""
    points = [
        (row[x], row[y], str(row.get("model", i)))
        for i, row in enumerate(rows)
        if is_number(row.get(x)) and is_number(row.get(y)) and math.isfinite(row[x]) and math.isfinite(row[y])
    ]
    if not points:
        return None
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = {**model_colors([label for _, _, label in points]), **(colors or {})}
    for px, py, label in points:
        ax.scatter([px], [py], s=60, color=colors[label], zorder=3, edgecolor="white", linewidth=0.8)
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(7, 5), fontsize=9)
    if all(px > 0 for px, _, _ in points):
        ax.set_xscale("log")
        xs = [px for px, _, _ in points]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.5)  # room for the labels right of each point
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_human))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if is_percent(y) and all(abs(py) <= 1 for _, py, _ in points):
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_xlabel(header(x))
    ax.set_ylabel(header(y))
    ax.set_title(f"{header(y)} vs {header(x).lower()}", fontsize=11)
    _style(ax)
    ax.grid(True, which="minor", alpha=0.1)
    return _save(fig, path)


def bins_ece(bins: Mapping[str, Any]) -> float:
    """ECE of reliability bins (uses a stored "ece" if the caller kept one)."""
    if is_number(bins.get("ece")):
        return float(bins["ece"])
    total = sum(bins["count"])
    return (
        sum(
            n / total * abs(a - c)
            for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"])
            if n
        )
        if total
        else float("nan")
    )


def reliability_diagrams(reliability: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """One panel per model: accuracy per confidence bin as bars, the gap to the bin's mean
    confidence hatched, and the diagonal of perfect calibration. ECE in each title."""
    models = [m for m, bins in reliability.items() if bins and sum(bins.get("count", [])) > 0]
    if not models:
        return None
    fig, axes = _grid(len(models), width=3.6, height=3.6, max_cols=4)
    for ax, model in zip(axes, models):
        bins = reliability[model]
        filled = [i for i, n in enumerate(bins["count"]) if n]
        lower = [bins["lower"][i] for i in filled]
        width = [bins["upper"][i] - bins["lower"][i] for i in filled]
        acc = [bins["accuracy"][i] for i in filled]
        conf = [bins["confidence"][i] for i in filled]
        ax.bar(
            lower,
            acc,
            width=width,
            align="edge",
            color="#1f77b4",
            edgecolor="white",
            linewidth=0.6,
            label="accuracy",
        )
        ax.bar(
            lower,
            [c - a for c, a in zip(conf, acc)],
            bottom=acc,
            width=width,
            align="edge",
            color=(1.0, 0.82, 0.82, 0.75),
            edgecolor="#d62728",
            hatch="///",
            linewidth=0.6,
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], linestyle="--", color="#444444", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{model}   ECE {100 * bins_ece(bins):.2f}%", fontsize=10)
        _style(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return _save(fig, path)
