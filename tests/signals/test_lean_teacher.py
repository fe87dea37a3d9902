"""The live teacher signals run a frozen Llama-family teacher through `LeanDecoder.hidden`: the same
logits and hidden states as the model's own forward at every token (padding on either side, every
supported family, fused and unfused matrices), the current weights after a change in place or a
move, and the model's own forward where the lean one would differ (training mode, autocast)."""

from __future__ import annotations

import pytest
import torch

from kdkit.losses.tokens import IGNORE_INDEX
from kdkit.samplers import fast_decode
from kdkit.samplers.fast_decode import frozen_teacher_decoder
from kdkit.signals import HiddenSignal, LogitsSignal
from tests.lm.test_fast_decode import CONFIGS, VOCAB, tiny

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


def padded_batch(padding: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Three rows of 9, 5 and 7 tokens padded to 9 on one side; the last 3 tokens of each are labels."""
    g = torch.Generator().manual_seed(2)
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), IGNORE_INDEX)
    for row, length in enumerate([9, 5, 7]):
        cols = slice(9 - length, 9) if padding == "left" else slice(0, length)
        ids[row, cols], mask[row, cols] = torch.randint(3, VOCAB, (length,), generator=g), 1
        last = cols.stop
        labels[row, last - 3 : last] = ids[row, last - 3 : last]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def model_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "model-matrices"])
def test_lean_teacher_logits_equal_the_model_forward_at_every_token(
    name, padding, fuse, monkeypatch
) -> None:
    if not fuse:
        monkeypatch.setattr(fast_decode, "FUSE_MAX_WIDTH", 0)
    model_type, extra = CONFIGS[name]
    model = tiny(model_type, **extra)
    batch = padded_batch(padding)
    assert frozen_teacher_decoder(model, "cpu") is not None  # the lean path is the one tested
    expected = model_logits(model, batch)
    target = LogitsSignal()(batch, teacher=model)
    tokens = batch["attention_mask"][:, target.start :].bool()
    own = expected[:, target.start :]
    torch.testing.assert_close(target.logits[tokens], own[tokens], rtol=0, atol=1e-5)
    hidden = HiddenSignal()(batch, teacher=model)
    every = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden.head.logits(hidden.hidden)[every], expected[every], rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_the_lean_teacher_reads_the_current_weights(device) -> None:
    model = tiny("llama", num_key_value_heads=2).to(device)
    batch = padded_batch("right", device)
    first = frozen_teacher_decoder(model, device)
    assert first is not None and frozen_teacher_decoder(model, device) is first  # kept between calls
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # changed in place
    changed = LogitsSignal()(batch, teacher=model)
    assert frozen_teacher_decoder(model, device) is not first
    own = model_logits(model, batch)[:, changed.start :]
    torch.testing.assert_close(changed.logits, own, rtol=0, atol=1e-5)
    model.double()  # new tensors, another dtype
    assert LogitsSignal()(batch, teacher=model).logits.dtype == torch.float64


def test_training_mode_and_autocast_use_the_model_forward() -> None:
    model = tiny("llama")
    assert frozen_teacher_decoder(model.train(), "cpu") is None
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen_teacher_decoder(model, "cpu") is None
        batch = padded_batch("right")
        target = LogitsSignal()(batch, teacher=model)
        assert torch.equal(target.logits, model_logits(model, batch)[:, target.start :])
