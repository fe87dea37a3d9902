"""Reports: a run folder's metrics.json, report.md, self-contained report.html and PNG plots."""

from kdkit.report.formatting import format_value, infer_columns
from kdkit.report.history import load_history
from kdkit.report.tables import classifier_results_table, lm_results_table
from kdkit.report.writer import jsonable, write_report

__all__ = [
    "classifier_results_table",
    "format_value",
    "infer_columns",
    "jsonable",
    "lm_results_table",
    "load_history",
    "write_report",
]
