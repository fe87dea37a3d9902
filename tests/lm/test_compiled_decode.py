"""Compiled decoding (`compile_decode`): the fixed-shape step and the token draw through
`torch.compile` give the eager decoder's logits and tokens, read the live weights, sample the
model's exact distribution, and fall back to the eager step with a logged reason when compiling
fails. Each compile takes seconds, so these are few and marked slow."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError

from kdkit.samplers import fast_decode
from kdkit.samplers.base import GenerationParams
from kdkit.samplers.fast_decode import StaticStepDecoder, cache_length
from kdkit.samplers.generation import GenerationSettings, sample_tokens
from tests.lm.test_fast_decode import (
    VOCAB,
    chi_square,
    left_padded,
    peaked_model_and_exact_probabilities,
    tiny,
)


@pytest.mark.slow
def test_compiled_decoding_equals_eager_and_reads_live_weights() -> None:
    """Greedy tokens with rows ending mid-way equal the dynamic lean path's, the compiled step's
    logits equal the eager fixed-shape step's to 1e-5 at every step, and after an AdamW step
    (in place) the kept compiled decoder draws the new weights' tokens."""
    fast_decode.clear_decoder_cache()
    model = tiny("qwen3", num_key_value_heads=2, head_dim=12)
    ids, mask = left_padded([6, 4, 5, 6], seed=3, device="cpu")
    free = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=12, graph_decode=False)
    kwargs = {
        "temperature": 0.0,
        "max_new_tokens": 12,
        "eos_token_ids": (int(free[1, 2]),),
        "pad_token_id": 0,
    }
    dynamic = sample_tokens(model, ids, mask, graph_decode=False, **kwargs)
    compiled = sample_tokens(model, ids, mask, compile_decode=True, **kwargs)
    assert torch.equal(compiled, dynamic)
    assert (compiled == 0).any()  # some row ended and was padded
    (decoder,) = fast_decode._decoders[model].values()
    assert decoder.compile_wanted and decoder.compile_failed is None

    # the step alone: compiled vs eager, the same static batch and cache
    length = cache_length(ids.shape[1], 8)
    padded = torch.nn.functional.pad(ids, (length - ids.shape[1] - 8, 0))
    padded_mask = torch.nn.functional.pad(mask, (length - ids.shape[1] - 8, 0))
    eager, fused = StaticStepDecoder(model, graph=False), StaticStepDecoder(model, graph=False, compile=True)
    with torch.no_grad():
        tokens = eager.prefill(padded, padded_mask, 8).argmax(-1)
        fused.prefill(padded, padded_mask, 8)
        for _ in range(7):
            expected, got = eager.step(tokens), fused.step(tokens)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            tokens = expected.argmax(-1)
    assert fused.compile_failed is None

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.3)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).sum().backward()
    optimizer.step()
    model.eval()
    after = sample_tokens(model, ids, mask, compile_decode=True, **kwargs)
    assert torch.equal(after, sample_tokens(model, ids, mask, graph_decode=False, **kwargs))
    assert not torch.equal(after, compiled)
    assert next(iter(fast_decode._decoders[model].values())) is decoder  # kept, not rebuilt


@pytest.mark.slow
def test_compiled_samples_follow_the_exact_distribution() -> None:
    """G samples of one prompt through the compiled prefill, draw and step (tokens 1 and 2; token 3
    is drawn eagerly after the last step): frequencies match softmax(logits / T) from the model's
    forward."""
    temperature = 0.7
    model, prompt, p1, p2 = peaked_model_and_exact_probabilities(temperature)
    fast_decode.clear_decoder_cache()
    for seed in (1, 0):  # the second call's prefill (shared by the 4000 rows) runs compiled too
        torch.manual_seed(seed)
        tokens = sample_tokens(
            model,
            prompt[None],
            torch.ones(1, 5, dtype=torch.long),
            temperature=temperature,
            max_new_tokens=3,
            num_samples=4000,
            compile_decode=True,
        )
    (decoder,) = fast_decode._decoders[model].values()
    assert decoder.prefills == 2 and decoder.compile_failed is None
    assert tokens.shape == (4000, 3)
    for column, probs in ((0, p1), (1, p2)):
        stat, dof = chi_square(torch.bincount(tokens[:, column], minlength=VOCAB), probs)
        assert dof >= 5
        assert stat < dof + 6 * (2 * dof) ** 0.5, f"token {column + 1}: chi2 = {stat:.1f} with {dof} dof"


def test_a_failed_compile_decodes_eagerly_with_the_reason_logged_once(caplog, monkeypatch) -> None:
    """torch.compile failing (here: made to) leaves the same tokens, drawn eagerly, and one debug line."""

    def broken_compile(fn, **options):
        def fails(*args):
            raise RuntimeError("no C++ compiler (test)")

        return fails

    monkeypatch.setattr(fast_decode.torch, "compile", broken_compile)
    monkeypatch.setattr(fast_decode, "_compiled_functions", {})
    fast_decode.clear_decoder_cache()
    fast_decode._logged.clear()
    model = tiny("llama", num_key_value_heads=2)
    ids, mask = left_padded([5, 3, 4], seed=7, device="cpu")
    kwargs = {"temperature": 0.0, "max_new_tokens": 6, "eos_token_ids": (2,), "pad_token_id": 0}
    expected = sample_tokens(model, ids, mask, graph_decode=False, **kwargs)
    with caplog.at_level(logging.DEBUG, logger="kdkit.samplers.fast_decode"):
        for _ in range(2):
            assert torch.equal(sample_tokens(model, ids, mask, compile_decode=True, **kwargs), expected)
    (decoder,) = fast_decode._decoders[model].values()
    assert decoder.compile_failed and "no C++ compiler" in decoder.compile_failed
    logged = [r.getMessage() for r in caplog.records if "decoding eagerly" in r.getMessage()]
    assert len(logged) == 1 and "no C++ compiler" in logged[0]


def test_compile_decode_needs_the_fixed_shape_step() -> None:
    with pytest.raises(ValidationError, match="compile_decode.*graph_decode"):
        GenerationParams(compile_decode=True, graph_decode=False)
    with pytest.raises(ValueError, match="compile_decode.*graph_decode"):
        GenerationSettings(compile_decode=True, graph_decode=False)
    assert GenerationParams(compile_decode=True).graph_decode is None
