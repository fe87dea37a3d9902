"""Evaluation: classifier metrics (accuracy, calibration, teacher agreement) and model footprint."""

from kdkit.eval.classifier import (
    classifier_metrics,
    collect_labels,
    expected_calibration_error,
    predict_logits,
    reliability_bins,
)
from kdkit.eval.footprint import count_parameters, measure_latency, model_footprint, size_on_disk

__all__ = [
    "classifier_metrics",
    "collect_labels",
    "count_parameters",
    "expected_calibration_error",
    "measure_latency",
    "model_footprint",
    "predict_logits",
    "reliability_bins",
    "size_on_disk",
]
