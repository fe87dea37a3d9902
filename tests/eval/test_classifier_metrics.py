"""Classifier metrics against hand-computed cases and float64 references."""

import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdkit.eval import classifier_metrics, collect_labels, predict_logits, reliability_bins


def logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_perfectly_calibrated_predictions_have_zero_ece():
    # Four predictions at confidence 0.75, three of them right: accuracy in the bin is exactly 0.75.
    logits = logits_from_probs([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    metrics = classifier_metrics(logits, labels)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["ece"] == pytest.approx(0.0, abs=1e-12)


def test_known_two_bin_example():
    # Bin (0, 0.5]: confidence 0.4, one of two right -> gap 0.1.
    # Bin (0.5, 1]: confidence 0.8, both right -> gap 0.2.  ECE = 0.5·0.1 + 0.5·0.2 = 0.15.
    logits = logits_from_probs([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3], [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    labels = torch.tensor([0, 1, 0, 0])
    metrics = classifier_metrics(logits, labels, n_bins=2)
    assert metrics["ece"] == pytest.approx(0.15)
    assert metrics["accuracy"] == pytest.approx(0.75)
    expected_nll = -(math.log(0.4) + math.log(0.3) + 2 * math.log(0.8)) / 4
    assert metrics["nll"] == pytest.approx(expected_nll)
    bins = metrics["reliability"]
    assert bins["lower"] == [0.0, 0.5] and bins["upper"] == [0.5, 1.0]
    assert bins["count"] == [2, 2]
    assert bins["confidence"] == pytest.approx([0.4, 0.8])
    assert bins["accuracy"] == pytest.approx([0.5, 1.0])
    assert "agreement" not in metrics


def test_reliability_bins_are_json_ready_and_mark_empty_bins():
    logits = torch.randn(200, 10) * 3
    labels = torch.randint(0, 10, (200,))
    metrics = classifier_metrics(logits, labels, teacher_logits=torch.randn(200, 10))
    bins = metrics["reliability"]
    assert all(len(bins[k]) == 15 for k in ("lower", "upper", "count", "confidence", "accuracy"))
    assert sum(bins["count"]) == 200
    assert bins["confidence"][0] is None  # confidence < 1/15 is impossible with 10 classes
    assert json.loads(json.dumps(metrics)) == metrics


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    bins = reliability_bins(torch.tensor([0.5, 0.0, 1.0]), torch.tensor([True, False, True]), n_bins=2)
    assert bins["count"] == [2, 1]


def test_identical_teacher_gives_full_agreement_and_zero_kl():
    logits = torch.randn(64, 7)
    metrics = classifier_metrics(logits, torch.randint(0, 7, (64,)), teacher_logits=logits.clone())
    assert metrics["agreement"] == 1.0
    assert metrics["kl_to_teacher"] == pytest.approx(0.0, abs=1e-12)


def test_kl_and_agreement_match_float64_reference():
    student, teacher = torch.randn(50, 6), torch.randn(50, 6) * 2
    metrics = classifier_metrics(student, torch.zeros(50, dtype=torch.long), teacher_logits=teacher)
    log_s = F.log_softmax(student.double(), -1)
    log_t = F.log_softmax(teacher.double(), -1)
    reference = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean").item()
    assert metrics["kl_to_teacher"] == pytest.approx(reference, rel=1e-10)
    assert metrics["kl_to_teacher"] > 0.05
    expected = (student.argmax(-1) == teacher.argmax(-1)).double().mean().item()
    assert metrics["agreement"] == pytest.approx(expected)
    assert 0 < metrics["agreement"] < 1


def test_kl_ignores_classes_the_teacher_rules_out():
    teacher = torch.tensor([[0.0, float("-inf"), 1.0]])
    metrics = classifier_metrics(torch.zeros(1, 3), torch.tensor([2]), teacher_logits=teacher)
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), -1)
    expected = float((p * (p.log() - math.log(1 / 3))).sum())
    assert metrics["kl_to_teacher"] == pytest.approx(expected)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="teacher logits"):
        classifier_metrics(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        classifier_metrics(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_predict_logits_keeps_order_and_restores_train_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Dropout(0.5))
    data = [{"inputs": torch.randn(3, 2, 2), "labels": i % 4} for i in range(10)]
    model.train()
    logits = predict_logits(model, data, batch_size=3)
    assert logits.shape == (10, 4)
    assert model.training
    expected = model.eval()(torch.stack([d["inputs"] for d in data]))  # eval: dropout off
    torch.testing.assert_close(logits, expected)
    assert not logits.requires_grad
    assert collect_labels(data).tolist() == [i % 4 for i in range(10)]


def test_predict_logits_reads_hf_style_outputs_and_custom_keys():
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.linear(x)}

    data = [{"pixels": torch.randn(3), "y": 1} for _ in range(5)]
    assert predict_logits(Wrapped(), data, input_key="pixels").shape == (5, 2)
    assert collect_labels(data, key="y").tolist() == [1] * 5
