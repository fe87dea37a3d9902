"""report.html: one self-contained file (inline CSS, plots as base64 PNG) that opens anywhere offline."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from kdkit.report.content import ReportContent
from kdkit.report.formatting import best_row, format_value, is_number

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #e3e7ee; --accent: #2456a6; --stripe: #f7f9fc; }
* { box-sizing: border-box; }
body { margin: 0; background: #f2f4f8; color: var(--ink);
       font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1080px; margin: 32px auto; padding: 36px 44px; background: #fff;
       border: 1px solid var(--line); border-radius: 10px; box-shadow: 0 2px 10px rgba(20,30,60,.05); }
h1 { margin: 0 0 4px; font-size: 26px; }
h2 { margin: 36px 0 12px; font-size: 19px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
.meta { color: var(--muted); font-size: 13px; margin: 0 0 8px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { padding: 8px 12px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: #eef2f8; text-align: left; font-weight: 600; color: #28324a; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: var(--stripe); }
tbody tr:hover { background: #eaf1fb; }
td.best { font-weight: 700; color: var(--accent); }
figure { margin: 20px 0 28px; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
figcaption b { color: var(--ink); }
ul.notes li { margin: 4px 0; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
      overflow-x: auto; font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
dl.env { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; font-size: 13px; }
dl.env dt { color: var(--muted); } dl.env dd { margin: 0; }
.legend { color: var(--muted); font-size: 12.5px; margin-top: 6px; }
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _class(*names: str) -> str:
    joined = " ".join(n for n in names if n)
    return f' class="{joined}"' if joined else ""


def _table(content: ReportContent) -> str:
    if not content.rows or not content.columns:
        return "<p><em>No results.</em></p>"
    keys = [key for key, _ in content.columns]
    numeric = {k: any(is_number(row.get(k)) for row in content.rows) for k in keys}
    best = {k: best_row(content.rows, k) for k in keys}
    head = "".join(f"<th{_class('num' if numeric[k] else '')}>{escape(h)}</th>" for k, h in content.columns)
    body = []
    for i, row in enumerate(content.rows):
        cells = []
        for key in keys:
            classes = _class("num" if numeric[key] else "", "best" if best[key] == i else "")
            cells.append(f"<td{classes}>{escape(format_value(key, row.get(key)))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    legend = (
        ('<p class="legend">Bold: best value of a column where the direction is clear; — : not measured.</p>')
        if any(b is not None for b in best.values())
        else ""
    )
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{legend}"
    )


def render_html(content: ReportContent, run_dir: Path) -> str:
    """The whole page as a string; plot paths in `content` are read relative to `run_dir`."""
    env = content.environment
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(content.title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{escape(content.title)}</h1>",
        f'<p class="meta">Generated {escape(content.created)} · kdkit {escape(str(env.get("kdkit", "?")))}'
        f" · torch {escape(str(env.get('torch', '?')))}</p>",
        "<h2>Results</h2>",
        _table(content),
    ]
    if content.plots:
        parts.append("<h2>Plots</h2>")
        for plot in content.plots:
            parts.append(
                f'<figure><img src="{_data_uri(run_dir / plot.path)}" alt="{escape(plot.title)}">'
                f"<figcaption><b>{escape(plot.title)}.</b> {escape(plot.caption)}</figcaption></figure>"
            )
    if content.notes:
        parts.append('<h2>Notes</h2><ul class="notes">')
        parts += [f"<li>{escape(note)}</li>" for note in content.notes]
        parts.append("</ul>")
    if content.config_yaml:
        parts.append(f"<h2>Configuration</h2><pre>{escape(content.config_yaml)}</pre>")
    if env:
        parts.append('<h2>Environment</h2><dl class="env">')
        parts += [f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in env.items()]
        parts.append("</dl>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"
