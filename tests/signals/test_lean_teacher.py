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
def test_lean_teacher_logits_equal_the_model_forward_at_every_token(name, padding, fuse, monkeypatch) -> None:
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


def shared_prefix_batch(prefix: list[int], tails: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Rows starting with the same `prefix` tokens, then `tails[i]` random tokens (the first one
    different in every row), right-padded; the last 2 tokens of each row are labels."""
    g = torch.Generator().manual_seed(seed)
    width = len(prefix) + max(tails)
    ids = torch.zeros(len(tails), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, tail in enumerate(tails):
        length = len(prefix) + tail
        ids[row, :length] = torch.cat([torch.tensor(prefix), torch.randint(3, VOCAB, (tail,), generator=g)])
        ids[row, len(prefix)] = 3 + row  # the rows part right after the prefix
        mask[row, :length] = 1
        labels[row, length - 2 : length] = ids[row, length - 2 : length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "model-matrices"])
def test_a_shared_prompt_prefix_is_computed_once_with_the_same_outputs(name, fuse, monkeypatch) -> None:
    """Rows sharing their first tokens (a system turn): the frozen decoder computes that prefix for one
    row, keeps it, reuses it for a later batch sharing part of it, and every token's logits and
    hidden states equal the model's forward (padding after the prefix, positions before and after
    the first trained one)."""
    if not fuse:
        monkeypatch.setattr(fast_decode, "FUSE_MAX_WIDTH", 0)
    model_type, extra = CONFIGS[name]
    model = tiny(model_type, **extra)
    lean = frozen_teacher_decoder(model, "cpu")
    assert lean is not None
    system = torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    first = shared_prefix_batch(system, [6, 3, 5], seed=1)
    second = shared_prefix_batch(system[:10], [8, 4], seed=2)  # shares 10 of the kept 12 tokens
    third = shared_prefix_batch(system + [7, 8], [3, 3], seed=3)  # longer than any kept prefix
    kept = []
    for batch in (first, second, third):
        expected = model_logits(model, batch)
        every = batch["attention_mask"].bool()
        target = LogitsSignal()(batch, teacher=model)
        own = expected[:, target.start :]
        tokens = every[:, target.start :]
        torch.testing.assert_close(target.logits[tokens], own[tokens], rtol=0, atol=1e-5)
        hidden = HiddenSignal()(batch, teacher=model)
        torch.testing.assert_close(
            hidden.head.logits(hidden.hidden)[every], expected[every], rtol=0, atol=1e-5
        )
        kept.append([len(key) for key in lean.prefixes])
    assert kept == [[12], [12], [12, 14]]  # the second batch reused the first prefix's first 10


def test_no_prefix_is_shared_where_rows_differ_or_gradients_flow() -> None:
    model = tiny("llama", num_key_value_heads=2)
    lean = frozen_teacher_decoder(model, "cpu")
    assert lean is not None
    system = list(range(3, 15))
    batch = shared_prefix_batch(system, [4, 5], seed=4)
    with torch.no_grad():
        lean.hidden(batch["input_ids"][:1], batch["attention_mask"][:1])  # one row: nothing to share
        lean.hidden(padded_batch("right")["input_ids"], padded_batch("right")["attention_mask"])
    assert not lean.prefixes
    trainable = fast_decode.LeanDecoder(model, trainable=True)
    trainable.hidden(batch["input_ids"], batch["attention_mask"])
    assert not trainable.prefixes
    with torch.no_grad():
        lean.hidden(batch["input_ids"], batch["attention_mask"])
    assert [len(key) for key in lean.prefixes] == [12]
