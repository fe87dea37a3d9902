"""Classifier metrics: accuracy, NLL, calibration (ECE, reliability bins) and teacher agreement.

Everything is computed in float64 from logits, so the numbers do not depend on how the model was run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


def _as_logits(output: Any) -> Tensor:
    """The logits of a model output: a tensor, a mapping with "logits", or an object with `.logits`."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _loader(dataset: Dataset | Iterable, batch_size: int) -> DataLoader:
    # Single-process loading: evaluation sets here are small and worker start-up would dominate.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset | Iterable,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    input_key: str = "inputs",
) -> Tensor:
    """Logits of `model` over a dataset of dict samples, in dataset order.

    dataset: yields dicts with `input_key` -> one input (e.g. [C, H, W]).
    Returns [N, C] float32 on the CPU. The model runs in eval mode without gradients and its
    previous train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        chunks = [
            _as_logits(model(batch[input_key].to(device))).float().cpu()
            for batch in _loader(dataset, batch_size)
        ]
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("predict_logits: the dataset is empty")
    return torch.cat(chunks)


def collect_labels(dataset: Dataset | Iterable, key: str = "labels") -> Tensor:
    """The integer labels of a dataset of dict samples, in dataset order. Returns [N] int64."""
    labels = [torch.as_tensor(batch[key]).reshape(-1) for batch in _loader(dataset, 4096)]
    if not labels:
        raise ValueError("collect_labels: the dataset is empty")
    return torch.cat(labels).long()


def reliability_bins(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> dict[str, list]:
    """Equal-width confidence bins over [0, 1] for a reliability diagram.

    confidence: [N] top-1 probability; correct: [N] bool. Bin b covers (b/n, (b+1)/n]; the first
    bin also takes confidence 0. Returns JSON-ready lists of length n_bins: lower, upper, count,
    confidence (mean confidence in the bin), accuracy (fraction correct); means are None for empty
    bins, so a plot can skip them instead of drawing a misleading 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    confidence = confidence.double().reshape(-1)
    correct = correct.double().reshape(-1)
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": count.tolist(),
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "accuracy": [float(s / c) if c else None for s, c in zip(correct_sum, count)],
    }


def expected_calibration_error(bins: Mapping[str, list]) -> float:
    """ECE from reliability bins: Σ_b (n_b / N) · |accuracy_b − confidence_b| (a fraction, not %)."""
    total = sum(bins["count"])
    if total == 0:
        return float("nan")
    return float(
        sum(
            n / total * abs(acc - conf)
            for n, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"])
            if n
        )
    )


def classifier_metrics(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Task and calibration metrics of a classifier, plus agreement with a teacher if given.

    logits: [N, C]; labels: [N] int; teacher_logits: [N, C] or None.
    Returns a JSON-ready dict: examples (N), accuracy (fraction), nll (mean cross-entropy, nats),
    ece (fraction), reliability (see `reliability_bins`); with a teacher also agreement (fraction of
    examples where the top-1 classes match) and kl_to_teacher (mean KL(p_T ‖ p_S), nats).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    log_p = torch.log_softmax(logits.double(), dim=-1)
    labels = labels.long().to(log_p.device)
    confidence, predicted = log_p.exp().max(dim=-1)
    correct = predicted == labels
    bins = reliability_bins(confidence, correct, n_bins)
    metrics: dict[str, Any] = {
        "examples": int(labels.numel()),
        "accuracy": float(correct.double().mean()),
        "nll": float(-log_p.gather(1, labels[:, None]).mean()),
        "ece": expected_calibration_error(bins),
        "reliability": bins,
    }
    if teacher_logits is not None:
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match student "
                f"logits {tuple(logits.shape)}"
            )
        log_t = torch.log_softmax(teacher_logits.double().to(log_p.device), dim=-1)
        # xlogy-style guard: classes with p_T = 0 contribute 0, not 0 · (−inf) = NaN.
        p_t = log_t.exp()
        kl = torch.where(p_t > 0, p_t * (log_t - log_p), torch.zeros_like(p_t)).sum(-1)
        metrics["agreement"] = float((log_t.argmax(-1) == predicted).double().mean())
        metrics["kl_to_teacher"] = float(kl.mean())
    return metrics
