"""Cell formats and headers inferred from metric names."""

import math

import pytest

from kdkit.report.formatting import best_row, format_value, header, infer_columns


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("accuracy", 0.9312, "93.12%"),
        ("token_agreement", 0.61, "61.00%"),
        ("ece", 0.0234, "2.34%"),
        ("exact_match_d3", 0.97, "97.00%"),  # LM and text reports printed 0.97
        ("accuracy", 93.1, "93.1"),  # already a percentage: shown as given
        ("parameters", 1.2e6, "1,200,000"),
        ("size_on_disk_bytes", 4_940_000, "4.94 MB"),
        ("latency_ms_median", 3.214, "3.21 ms"),
        ("latency_ms_p90", 123.45, "123.5 ms"),
        ("perplexity", 12.3456, "12.35"),
        ("steps", 3000, "3,000"),
        ("model", "student", "student"),
        ("nll", None, "—"),
        ("nll", math.nan, "—"),
        ("dp", True, "yes"),
    ],
)
def test_format_value(key, value, text):
    assert format_value(key, value) == text


def test_headers_and_inferred_columns():
    assert header("kl_to_teacher") == "KL(T‖S) (nats)"
    assert header("eval_loss") == "Eval loss"
    rows = [{"accuracy": 0.9, "model": "t", "reliability": {"count": []}}, {"model": "s", "f1": 0.5}]
    assert [k for k, _ in infer_columns(rows)] == ["model", "accuracy", "f1"]


def test_best_row_knows_the_direction_of_known_metrics():
    rows = [
        {"accuracy": 0.9, "ece": 0.05, "parameters": 10, "kl_to_teacher": 0.0},
        {"accuracy": 0.8, "ece": 0.01, "parameters": 5, "kl_to_teacher": 0.3},
    ]
    assert best_row(rows, "accuracy") == 0
    assert best_row(rows, "ece") == 1
    assert best_row(rows, "kl_to_teacher") == 0
    assert best_row(rows, "parameters") is None
    assert best_row([{"exact_match_d4": 0.2}, {"exact_match_d4": 0.7}], "exact_match_d4") == 1
    assert best_row(rows[:1], "accuracy") is None
