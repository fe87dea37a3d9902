"""The figures: drawn when there is data, skipped (None) when there is not."""

from kdkit.report.history import loss_terms
from kdkit.report.plots import model_colors, reliability_diagrams, scatter, training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_loss_terms_skip_bookkeeping_fields():
    records = [
        {"step": 0, "lr": 1e-3, "elapsed_s": 1.0, "examples_per_s": 9.0, "kd": 1.0, "note": "x"},
        {"step": 5, "eval_accuracy": 0.5, "flag": True},
    ]
    assert loss_terms(records) == ["kd", "eval_accuracy"]


def test_curves_with_long_noisy_runs_and_terms_missing_for_some_models(tmp_path):
    long_run = [{"step": s, "loss": 1.0 / (s + 1), "kd": 0.5} for s in range(120)]
    short_run = [{"step": s, "loss": 2.0 / (s + 1), "val": float("nan")} for s in range(0, 120, 10)]
    path = training_curves({"a": long_run, "b": short_run}, tmp_path / "curves.png")
    assert path is not None and path.read_bytes().startswith(PNG_MAGIC)
    assert training_curves({"a": [{"step": 0, "lr": 0.1}]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_scatter_needs_both_keys(tmp_path):
    rows = [{"model": "t", "parameters": 1e6}, {"model": "s", "accuracy": 0.5}]
    assert scatter(rows, "parameters", "accuracy", tmp_path / "s.png") is None
    rows.append({"model": "u", "parameters": 0, "accuracy": 0.7})  # zero: linear x axis, still drawn
    assert scatter(rows, "parameters", "accuracy", tmp_path / "s.png") == tmp_path / "s.png"


def test_reliability_skips_models_without_counts(tmp_path):
    empty = {"lower": [0.0], "upper": [1.0], "count": [0], "confidence": [None], "accuracy": [None]}
    assert reliability_diagrams({"a": empty}, tmp_path / "r.png") is None
    full = {
        "lower": [0.0, 0.5],
        "upper": [0.5, 1.0],
        "count": [3, 0],
        "confidence": [0.4, None],
        "accuracy": [0.3, None],
    }
    assert reliability_diagrams({"a": empty, "b": full}, tmp_path / "r.png") is not None


def test_model_colors_are_stable_across_figures():
    colors = model_colors(["teacher", "student"], ["student", "baseline"])
    assert list(colors) == ["teacher", "student", "baseline"]
    assert len(set(colors.values())) == 3
