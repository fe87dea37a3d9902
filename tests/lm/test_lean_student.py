"""The student's forward through a trainable `LeanDecoder` (`StudentView`): the same logits and the
same gradient of every parameter as the model's own forward in training mode (every supported
family, padding on either side, the trained-logits window, the fused path's hidden states), and the
model's own forward wherever the lean one would differ."""

from __future__ import annotations

import pytest
import torch

from kdkit.objectives.lm import StudentView
from kdkit.samplers import fast_decode
from kdkit.samplers.fast_decode import LEAN_STUDENT_ENV, trainable_student_decoder
from tests.lm.test_fast_decode import CONFIGS, tiny
from tests.signals.test_lean_teacher import padded_batch


def _views(model, batch, monkeypatch):
    """(lean view, the model's own view) of the same batch."""
    lean = StudentView(model, batch)
    assert lean.lean is not None  # the lean path is the one tested
    monkeypatch.setenv(LEAN_STUDENT_ENV, "0")
    own = StudentView(model, batch)
    assert own.lean is None
    monkeypatch.delenv(LEAN_STUDENT_ENV)
    return lean, own


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(model, lean_loss, own_loss) -> None:
    lean, own = _grads(model, lean_loss), _grads(model, own_loss)
    assert lean.keys() == own.keys() == {n for n, _ in model.named_parameters()}
    for name in own:
        torch.testing.assert_close(lean[name], own[name], rtol=0, atol=1e-5, msg=name)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A completion loss over the trained positions (labels shifted, as the objectives do), with
    weights that differ per position and per vocabulary entry, so every gradient is exercised."""
    shifted = labels[:, 1:] if logits.shape[1] == labels.shape[1] else labels
    logits = logits[:, :-1] if logits.shape[1] == labels.shape[1] else logits
    keep = shifted != -100
    weights = torch.linspace(0.5, 1.5, logits.shape[-1])
    return (logits.log_softmax(-1)[keep] * weights).mean() + torch.nn.functional.cross_entropy(
        logits[keep], shifted[keep]
    )


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "model-matrices"])
def test_lean_student_logits_and_every_gradient_equal_the_model_forward(name, padding, fuse, monkeypatch):
    if not fuse:
        monkeypatch.setattr(fast_decode, "TRAINABLE_FUSE_MAX_WIDTH", 0)
    model_type, extra = CONFIGS[name]
    model = tiny(model_type, **extra).train()
    batch = padded_batch(padding)
    tokens = batch["attention_mask"].bool()
    lean, own = _views(model, batch, monkeypatch)
    torch.testing.assert_close(lean.logits[tokens], own.logits[tokens], rtol=0, atol=1e-5)
    labels = batch["labels"]
    _assert_same_grads(model, _loss(lean.logits, labels), _loss(own.logits, labels))

    # the trained-logits window (positions from `start` only) and the fused path's hidden states
    lean, own = _views(model, batch, monkeypatch)
    (lean_window, window_labels), (own_window, _) = lean.trained_logits, own.trained_logits
    assert lean.start > 0 and lean_window.shape == own_window.shape
    _assert_same_grads(model, _loss(lean_window, window_labels), _loss(own_window, window_labels))
    lean, own = _views(model, batch, monkeypatch)
    (lean_hidden, head), (own_hidden, _) = lean.hidden, own.hidden
    torch.testing.assert_close(lean_hidden[tokens], own_hidden[tokens], rtol=0, atol=1e-5)
    _assert_same_grads(model, _loss(head.logits(lean_hidden), labels), _loss(head.logits(own_hidden), labels))
