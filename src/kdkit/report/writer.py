"""write_report: one call turns a run's results into metrics.json, report.md, report.html and plots."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from kdkit.report import plots
from kdkit.report.content import Plot, ReportContent
from kdkit.report.formatting import header, infer_columns
from kdkit.report.history import load_history
from kdkit.report.html import render_html
from kdkit.report.markdown import render_markdown


def jsonable(value: Any) -> Any:
    """`value` with tensors, numpy values, paths and tuples turned into plain JSON types.
    NaN and ±inf become None: they are not valid JSON and other tools would refuse the file."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions and machine facts that a number in the report depends on."""
    import torch  # already loaded by any caller that has a model; kept local so plots-only use is light

    env: dict[str, Any] = {
        "kdkit": _version("kdkit"),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


def _plots(
    run_dir: Path,
    rows: list[dict[str, Any]],
    histories: Mapping[str, Path] | None,
    reliability: Mapping[str, Mapping[str, Any]] | None,
    scatter: tuple[str, str] | None,
) -> list[Plot]:
    made: list[Plot] = []
    plot_dir = run_dir / "plots"
    colors = plots.model_colors(
        [str(row.get("model", i)) for i, row in enumerate(rows)], list(histories or {})
    )
    if histories:
        loaded = {model: load_history(path) for model, path in histories.items() if Path(path).exists()}
        path = plots.training_curves(loaded, plot_dir / "training_curves.png", colors)
        if path:
            made.append(
                Plot(
                    "curves",
                    "Training curves",
                    "Each logged loss term against the optimisation step, one line per model "
                    "(long runs: faint raw values, bold moving average; log scale where a term "
                    "spans decades).",
                    path,
                )
            )
    if scatter:
        x, y = scatter
        path = plots.scatter(rows, x, y, plot_dir / f"{y}_vs_{x}.png", colors)
        if path:
            made.append(
                Plot(
                    "scatter",
                    f"{header(y)} vs {header(x).lower()}",
                    f"One point per model; {header(x).lower()} on a log scale where all values are positive.",
                    path,
                )
            )
    if reliability:
        path = plots.reliability_diagrams(reliability, plot_dir / "reliability.png")
        if path:
            made.append(
                Plot(
                    "reliability",
                    "Reliability diagrams",
                    "Accuracy per equal-width confidence bin (bars) against the bin's mean "
                    "confidence (hatched gap); a calibrated model follows the diagonal. ECE is "
                    "the count-weighted mean gap.",
                    path,
                )
            )
    return made


def write_report(
    run_dir: Path,
    *,
    title: str,
    rows: list[dict],
    columns: list[tuple[str, str]] | None = None,
    histories: dict[str, Path] | None = None,
    reliability: dict[str, dict] | None = None,
    config: dict | None = None,
    notes: list[str] | None = None,
    extra: dict | None = None,
    scatter: tuple[str, str] | None = ("parameters", "accuracy"),
) -> dict[str, Path]:
    """Write a run's report folder and return the paths written, by name.

    rows: one dict per model, e.g. {"model": "teacher", "accuracy": 0.93, "parameters": 1.2e6};
    any numeric keys are allowed, None or missing shows as "—". columns: (key, header) pairs to show,
    default every scalar key. histories: model -> its metrics.jsonl (training curves). reliability:
    model -> `kdkit.eval.reliability_bins` output. scatter: (x key, y key) or None.
    Writes run_dir/metrics.json (everything, plus versions, machine and timestamp), report.md,
    report.html (self-contained) and PNGs under run_dir/plots/. Returned keys: "metrics",
    "markdown", "html", and one per plot made ("curves", "scatter", "reliability").
    Pieces that are absent (no histories, no reliability, no row with both scatter keys) are skipped.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [jsonable(row) for row in rows]  # tensors and numpy scalars as plain numbers
    shown = list(columns) if columns is not None else infer_columns(rows)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    env = environment()
    made = _plots(run_dir, rows, histories, reliability, scatter)
    config_json = jsonable(config) if config is not None else None
    content = ReportContent(
        title=title,
        created=created,
        rows=rows,
        columns=shown,
        plots=[Plot(p.key, p.title, p.caption, p.path.relative_to(run_dir)) for p in made],
        notes=list(notes or []),
        config_yaml=yaml.safe_dump(config_json, sort_keys=False, allow_unicode=True) if config_json else None,
        environment=env,
    )
    written: dict[str, Path] = {}
    written["metrics"] = run_dir / "metrics.json"
    written["metrics"].write_text(
        json.dumps(
            jsonable(
                {
                    "title": title,
                    "created": created,
                    "rows": rows,
                    "columns": [list(c) for c in shown],
                    "reliability": reliability,
                    "config": config_json,
                    "notes": content.notes,
                    "extra": extra,
                    "histories": histories,
                    "plots": {p.key: p.path for p in content.plots},
                    "environment": env,
                }
            ),
            indent=2,
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    written["markdown"] = run_dir / "report.md"
    written["markdown"].write_text(render_markdown(content), encoding="utf-8")
    written["html"] = run_dir / "report.html"
    written["html"].write_text(render_html(content, run_dir), encoding="utf-8")
    written.update({p.key: p.path for p in made})
    return written
