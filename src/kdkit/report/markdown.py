"""report.md: the results table, plots as image links, notes and the config as a YAML block."""

from __future__ import annotations

from kdkit.report.content import ReportContent
from kdkit.report.formatting import best_row, format_value, is_number


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(content: ReportContent) -> str:
    """A pipe table; numeric columns right-aligned, the best value of a known metric in bold."""
    if not content.rows or not content.columns:
        return "_No results._"
    keys = [key for key, _ in content.columns]
    numeric = {k: any(is_number(row.get(k)) for row in content.rows) for k in keys}
    best = {k: best_row(content.rows, k) for k in keys}
    lines = [
        "| " + " | ".join(_cell(h) for _, h in content.columns) + " |",
        "|" + "|".join("---:" if numeric[k] else ":---" for k in keys) + "|",
    ]
    for i, row in enumerate(content.rows):
        cells = []
        for key in keys:
            text = _cell(format_value(key, row.get(key)))
            cells.append(f"**{text}**" if best[key] == i else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(content: ReportContent) -> str:
    env = content.environment
    parts = [
        f"# {content.title}",
        "",
        f"_Generated {content.created} with kdkit {env.get('kdkit', '?')}, torch {env.get('torch', '?')}._",
        "",
        "## Results",
        "",
        results_table(content),
    ]
    if content.plots:
        parts += ["", "## Plots"]
        for plot in content.plots:
            parts += [
                "",
                f"### {plot.title}",
                "",
                f"![{plot.title}]({plot.path.as_posix()})",
                "",
                f"_{plot.caption}_",
            ]
    if content.notes:
        parts += ["", "## Notes", ""] + [f"- {note}" for note in content.notes]
    if content.config_yaml:
        parts += ["", "## Configuration", "", "```yaml", content.config_yaml.rstrip(), "```"]
    if env:
        parts += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    return "\n".join(parts) + "\n"
