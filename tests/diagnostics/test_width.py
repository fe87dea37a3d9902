"""Minimum-width predictor: the formula (paper's worked example), floors, calibration, planted features."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdkit.diagnostics.width import (
    AUTO_L1,
    MIN_EXPLAINED_VARIANCE,
    capacity_per_dim,
    critical_width,
    fit_affine,
    planted_activations,
    plot_floor,
    predict_from_stats,
    predict_width,
    predicted_floor,
    sae_stats,
    train_sae,
)


def test_capacity_formula_and_the_papers_worked_example() -> None:
    # g(α) = 1/((1−α)·ln(1/(1−α))), by hand at α = 0.992
    assert capacity_per_dim(0.992) == pytest.approx(1 / (0.008 * math.log(125)), rel=1e-12)
    assert capacity_per_dim(0.992) == pytest.approx(25.89, abs=0.01)
    # Pythia-410M: F ≈ 28,700 at α ≈ 0.992 gives d* ≈ 1,065. The formula at α = 0.992 exactly gives
    # 1,108.6; 1,065 corresponds to α ≈ 0.9924, inside the interval that rounds to 0.992.
    assert critical_width(28_700, 0.992) == pytest.approx(1108.6, abs=0.1)
    assert critical_width(28_700, 0.9925) < 1065 < critical_width(28_700, 0.9915)
    assert critical_width(28_700, 0.9924) == pytest.approx(1065, rel=0.002)
    # sparser features pack more per dimension (in the sparse regime α > 1 − 1/e)
    assert capacity_per_dim(0.99) > capacity_per_dim(0.9) > capacity_per_dim(0.7)
    assert capacity_per_dim(1 - 1 / math.e) == pytest.approx(math.e)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="alpha"):
            capacity_per_dim(bad)


def test_floor_drops_the_least_important_features_past_capacity() -> None:
    alpha = 0.9
    g = capacity_per_dim(alpha)  # ≈ 4.34 features per dimension
    importances = [1.0, 4.0, 2.0, 3.0] * 5  # 20 features, total 50
    assert predicted_floor(importances, alpha, width=0) == pytest.approx(1.0)
    one = predicted_floor(importances, alpha, width=1)  # keeps the 4 largest: 4+4+4+4 = 16
    assert math.floor(g) == 4 and one == pytest.approx(1 - 16 / 50)
    assert predicted_floor(importances, alpha, critical_width(20, alpha)) == pytest.approx(0.0)
    floors = [predicted_floor(importances, alpha, w) for w in range(0, 7)]
    assert all(a >= b for a, b in zip(floors, floors[1:]))  # never rises with width


def test_affine_calibration_recovers_baseline_and_scale() -> None:
    floors = [0.0, 0.1, 0.3, 0.6]
    fit = fit_affine(floors, [0.2 + 2.0 * f for f in floors])
    assert fit["baseline"] == pytest.approx(0.2) and fit["scale"] == pytest.approx(2.0)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit_affine(floors, [0.3, 0.1, 0.5, 0.2])["r2"] < 0.9


def test_prediction_table_and_plot(tmp_path: Path) -> None:
    x, _ = planted_activations(12, 8, 0.9, 600, seed=1)
    prediction = predict_width(x, [2, 4, 8], dictionary_size=32, steps=60)
    assert [row["width"] for row in prediction.rows] == [2.0, 4.0, 8.0]
    assert prediction.teacher_width == 8 and prediction.num_features > 0
    assert "| 4 |" in prediction.table()
    path = plot_floor(prediction, tmp_path / "floor.png", measured={2: 0.5, 8: 0.1})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_planted_features_give_the_planted_critical_width() -> None:
    """32 planted features in 32 dimensions at α = 0.95: the SAE estimate of d* = F/g(α) is within
    10% of the planted value (measured: F̂ = 32, α̂ = 0.951, d̂* = 4.75 vs 4.79)."""
    features, alpha = 32, 0.95
    x, directions = planted_activations(features, 32, alpha, 6000, seed=0)
    sae = train_sae(x, dictionary_size=128, steps=1000, seed=0)
    stats = sae_stats(sae, x)
    planted = critical_width(features, alpha)
    predicted = critical_width(stats.num_features, stats.alpha)
    assert abs(predicted - planted) / planted < 0.10
    assert abs(stats.num_features - features) <= 3
    # the recovered dictionary contains the planted directions
    assert (directions @ sae.decoder).max(dim=1).values.median() > 0.9
    prediction = predict_from_stats(stats, [1, 2, 4, 8], teacher_width=32)
    floors = [row["floor"] for row in prediction.rows]
    assert floors[-1] == 0.0 and floors[0] > 0.5 and floors == sorted(floors, reverse=True)
    assert not prediction.warnings
    torch.testing.assert_close(torch.tensor(stats.alpha), torch.tensor(alpha), atol=0.01, rtol=0)


@pytest.mark.slow
def test_outlier_dimensions_need_per_dimension_standardisation() -> None:
    """Two residual dimensions scaled ×20 (as in BERT-style residual streams): with one global scale
    the SAE spends itself on them and F̂ collapses (measured: 7 of 32 planted features); scaling each
    dimension first recovers the planted F and α."""
    x, _ = planted_activations(32, 32, 0.95, 6000, seed=0)
    x[:, :2] *= 20
    collapsed = sae_stats(train_sae(x, dictionary_size=128, steps=1000, seed=0), x)
    assert collapsed.num_features < 20
    sae = train_sae(x, dictionary_size=128, steps=1000, seed=0, per_dimension=True)
    assert sae.scale.shape == (32,)
    stats = sae_stats(sae, x)
    assert abs(stats.num_features - 32) <= 3
    planted = critical_width(32, 0.95)
    assert abs(critical_width(stats.num_features, stats.alpha) - planted) / planted < 0.10


def test_auto_l1_lowers_the_penalty_until_the_sae_explains_the_layer() -> None:
    """Dense activations (every direction active): a strong penalty explains little of them, and a
    prediction from such an SAE must say so; "auto" walks down AUTO_L1 until the SAE explains
    MIN_EXPLAINED_VARIANCE, recording every fit (on MiniLM l1 = 0.3 explained 53-61% and predicted
    floors of 0 where trained students lost 20-46% of the layer)."""
    torch.manual_seed(0)
    x = torch.randn(2000, 8)
    fixed = predict_width(x, [2, 4, 8], l1=0.3, steps=300, dictionary_size=32)
    assert fixed.sae["explained_variance"] < MIN_EXPLAINED_VARIANCE
    assert any("explains only" in w for w in fixed.warnings)
    auto = predict_width(x, [2, 4, 8], l1="auto", steps=300, dictionary_size=32)
    sweep = auto.sae["l1_sweep"]
    assert [s["l1"] for s in sweep] == list(AUTO_L1[: len(sweep)]) and len(sweep) > 1
    assert all(s["explained_variance"] < MIN_EXPLAINED_VARIANCE for s in sweep[:-1])
    assert auto.sae["l1"] == sweep[-1]["l1"]
    assert auto.sae["explained_variance"] == sweep[-1]["explained_variance"]
    assert auto.sae["explained_variance"] >= MIN_EXPLAINED_VARIANCE or len(sweep) == len(AUTO_L1)
