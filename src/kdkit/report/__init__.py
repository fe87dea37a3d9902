"""Reports: a run folder's metrics.json, report.md, self-contained report.html and PNG plots."""

from kdkit.report.formatting import format_value, infer_columns
from kdkit.report.history import load_history
from kdkit.report.writer import jsonable, write_report

__all__ = ["format_value", "infer_columns", "jsonable", "load_history", "write_report"]
