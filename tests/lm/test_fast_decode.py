"""The lean decoder (kdkit.samplers.fast_decode): the same logits as the Hugging Face forward at every
decode position (Llama / Mistral / Qwen2 / Qwen3, GQA, biases, q/k norms, tied embeddings, padding on
either side, dropped and repeated rows), samples from the model's exact distribution, the live
weights, and a logged fallback for everything it does not reproduce."""

from __future__ import annotations

import copy as copy_module
import logging

import pytest
import torch
from torch import Tensor

from kdkit.samplers import fast_decode, generation
from kdkit.samplers.fast_decode import LeanDecoder, StaticStepDecoder, lean_decoder_support
from kdkit.samplers.generation import sample_tokens

VOCAB = 40
CONFIGS = {
    "llama-gqa-tied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama-biases-untied": (
        "llama",
        {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    ),
    "llama3-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "mistral-gqa": ("mistral", {"num_key_value_heads": 1, "sliding_window": None}),
    "qwen2-gqa-bias": ("qwen2", {"num_key_value_heads": 2}),
    "qwen3-qk-norm": ("qwen3", {"num_key_value_heads": 2, "head_dim": 12}),
}


def tiny(model_type: str, seed: int = 0, **extra):
    """A random 2-layer model of the family with non-trivial norm weights and biases."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"num_key_value_heads": 4, **extra}  # (Mistral's and Qwen2's defaults exceed 4 heads)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # norms != 1, biases != 0
    return model


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def reference_logits(model, rows: list[Tensor]) -> list[Tensor]:
    """Each unpadded row's last-position logits from the model's own forward [V]."""
    with torch.no_grad():
        return [model(row[None]).logits[0, -1] for row in rows]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("path", ["fused", "model-matrices", "weight-first"])
def test_lean_logits_equal_the_model_forward_at_every_position(
    name: str, padding: str, path: str, monkeypatch
) -> None:
    if path != "fused":  # the path wide models take: the model's own q/k/v, gate/up matrices, no folding
        monkeypatch.setattr(fast_decode, "FUSE_MAX_WIDTH", 0)
    if path == "weight-first":  # and (W·xᵀ)ᵀ for a few rows by a large weight on a CPU
        monkeypatch.setattr(fast_decode, "WEIGHT_FIRST_MIN_NUMEL", 0)
    model_type, extra = CONFIGS[name]
    model = tiny(model_type, **extra)
    assert lean_decoder_support(model, 20) is None
    g = torch.Generator().manual_seed(1)
    lengths = [7, 4, 5]
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(7 - len(p), 7) if padding == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = p, 1
    decoder = LeanDecoder(model)
    with torch.no_grad():
        logits = decoder.prefill(ids, mask, max_new_tokens=8)
    decoder.repeat_interleave(2)  # rows 2i, 2i+1 continue prompt i
    rows = [p.clone() for p in prompts for _ in range(2)]
    logits = logits.repeat_interleave(2, 0)
    for step in range(7):
        expected = torch.stack(reference_logits(model, rows))
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        chosen = torch.randint(3, VOCAB, (len(rows),), generator=g)
        if step == 2:  # drop two rows mid-way, as the sampling loop does for finished rows
            keep = torch.tensor([0, 2, 3, 5])
            decoder.select(keep)
            rows, chosen = [rows[i] for i in keep.tolist()], chosen[keep]
        rows = [torch.cat([r, c[None]]) for r, c in zip(rows, chosen)]
        with torch.no_grad():
            logits = decoder.step(chosen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-biases-untied", "mistral-gqa", "qwen3-qk-norm"])
def test_static_step_logits_equal_the_dynamic_step_and_the_model(name: str, device: str) -> None:
    """The fixed-shape step (whole static batch, attention over the whole zero-initialised cache,
    slot and positions in device tensors; a CUDA graph replay on cuda) gives the dynamic lean
    step's and the model's logits at every position: left-padded prompts, G = 2 samples per prompt,
    rows dropped mid-way (kept in the static batch, left out of the output)."""
    model_type, extra = CONFIGS[name]
    model = tiny(model_type, **extra).to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p) :], mask[i, 7 - len(p) :] = p, 1
    ids, mask = ids.to(device), mask.to(device)
    static, dynamic = StaticStepDecoder(model, graph=device == "cuda"), LeanDecoder(model)
    with torch.no_grad():  # rows 2i, 2i+1 continue prompt i
        logits = static.prefill(ids, mask, max_new_tokens=8, repeats=2)
        expected_dynamic = dynamic.prefill(ids, mask, max_new_tokens=8)
    dynamic.repeat_interleave(2)
    rows = [p.to(device) for p in prompts for _ in range(2)]
    expected_dynamic = expected_dynamic.repeat_interleave(2, 0)
    atol = 1e-5 if device == "cpu" else 1e-4  # GPU kernels sum in another order
    for step in range(7):
        assert bool(torch.isfinite(logits).all())
        torch.testing.assert_close(logits, torch.stack(reference_logits(model, rows)), rtol=0, atol=atol)
        torch.testing.assert_close(logits, expected_dynamic, rtol=0, atol=atol)
        chosen = torch.randint(3, VOCAB, (len(rows),), generator=g).to(device)
        if step in (2, 4):  # drop rows mid-way, as the sampling loop does for finished rows
            keep = torch.tensor([0, 2, 3, 5] if step == 2 else [1, 2], device=device)
            static.select(keep)
            dynamic.select(keep)
            rows, chosen = [rows[i] for i in keep.tolist()], chosen[keep]
        rows = [torch.cat([r, c[None]]) for r, c in zip(rows, chosen)]
        with torch.no_grad():
            logits, expected_dynamic = static.step(chosen), dynamic.step(chosen)
    assert static.keys[0].shape[0] == 6  # the static batch kept every row
    if device == "cuda":  # the graph was captured and replayed, not silently skipped
        assert static.graph is not None and static.graph_failed is None, static.graph_failed
    else:
        assert static.graph is None


@pytest.mark.parametrize("device", DEVICES)
def test_graph_decode_samples_equal_the_dynamic_lean_path(device: str) -> None:
    """sample_tokens with the fixed-shape step (graph_decode=True; a CUDA graph on cuda) draws the
    dynamic lean path's greedy tokens, with EOS ending rows mid-way, and reads the live weights."""
    model = tiny("qwen3", num_key_value_heads=2, head_dim=12).to(device)
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    free = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=10, graph_decode=False)
    stop = int(free[0, 3])
    kwargs = {"temperature": 0, "max_new_tokens": 10, "eos_token_ids": (stop,), "pad_token_id": 0}
    dynamic = sample_tokens(model, ids, mask, graph_decode=False, **kwargs)
    assert torch.equal(sample_tokens(model, ids, mask, graph_decode=True, **kwargs), dynamic)
    # every row ends by its third token: the whole-batch loop (which asks the device whether all
    # rows ended only every EOS_CHECK_EVERY steps) returns the same width and padding
    early = {**kwargs, "eos_token_ids": tuple(sorted(set(free[:, 2].tolist())))}
    dynamic = sample_tokens(model, ids, mask, graph_decode=False, **early)
    assert dynamic.shape[1] <= 3 < generation.EOS_CHECK_EVERY
    assert torch.equal(sample_tokens(model, ids, mask, graph_decode=True, **early), dynamic)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    after = sample_tokens(model, ids, mask, graph_decode=False, **kwargs)
    assert torch.equal(sample_tokens(model, ids, mask, graph_decode=True, **kwargs), after)
    assert not torch.equal(after[:, 0], free[:, 0])


def test_the_fixed_shape_loop_stops_at_the_last_eos_off_cuda() -> None:
    """Off CUDA, where asking whether every row ended costs no device wait, the whole-batch loop
    asks at every step: no decode steps run past the step where the last row ended."""
    fast_decode.clear_decoder_cache()
    model = tiny("qwen3", num_key_value_heads=2, head_dim=12)
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    free = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=10, graph_decode=False)
    eos = tuple(sorted(set(free[:, 1].tolist())))  # every row ends by its second token
    kwargs = {"temperature": 0, "max_new_tokens": 10, "eos_token_ids": eos, "pad_token_id": 0}
    tokens = sample_tokens(model, ids, mask, graph_decode=True, **kwargs)
    assert torch.equal(tokens, sample_tokens(model, ids, mask, graph_decode=False, **kwargs))
    (decoder,) = fast_decode._decoders[model].values()
    assert decoder.step_index <= 2 < generation.EOS_CHECK_EVERY


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_capture_decodes_eagerly_with_a_reason_logged_once(device: str, caplog, monkeypatch) -> None:
    """No graph (a CPU; on cuda a capture made to fail): the same fixed-shape step runs eagerly,
    the same tokens come out, and the reason is logged once at debug level."""
    if device == "cuda":

        def broken(*args, **kwargs):
            raise RuntimeError("capture refused (test)")

        monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", broken)
    model = tiny("llama", num_key_value_heads=2).to(device)
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(7)).to(device)
    mask = torch.ones_like(ids)
    expected = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=6, graph_decode=False)
    fast_decode._logged.clear()
    with caplog.at_level(logging.DEBUG, logger="kdkit.samplers.fast_decode"):
        for _ in range(2):
            decoder = StaticStepDecoder(model, graph=True)
            with torch.no_grad():
                tokens = [decoder.prefill(ids, mask, 6).argmax(-1)]
                for _ in range(5):
                    tokens.append(decoder.step(tokens[-1]).argmax(-1))
            assert decoder.graph is None and decoder.graph_failed
            assert torch.equal(torch.stack(tokens, 1), expected)
    logged = [r.getMessage() for r in caplog.records if "decoding eagerly" in r.getMessage()]
    assert len(logged) == 1 and ("no CUDA graphs" if device == "cpu" else "capture refused") in logged[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graph_is_captured_under_deterministic_algorithms_cuda(monkeypatch) -> None:
    """kdkit trains on GPUs under torch.use_deterministic_algorithms(warn_only=True), where
    index_copy_ / index_put_ check their indices on the host (a sync, which breaks capture): the
    graphed step still captures there and draws the dynamic step's tokens."""
    from kdkit.engine.trainer import deterministic_algorithms

    model = tiny("qwen3", num_key_value_heads=2, head_dim=12).to("cuda")
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(8)).to("cuda")
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    free = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=8, graph_decode=False)
    kwargs = {"temperature": 0, "max_new_tokens": 8, "eos_token_ids": (int(free[1, 2]),), "pad_token_id": 0}
    with deterministic_algorithms(True, torch.device("cuda")):
        graphed = sample_tokens(model, ids, mask, graph_decode=None, **kwargs)  # None: graphs on cuda
        dynamic = sample_tokens(model, ids, mask, graph_decode=False, **kwargs)
    made = list(fast_decode._decoders[model].values())
    assert len(made) == 1 and made[0].graph is not None, made[0].graph_failed if made else "no decoder"
    assert torch.equal(graphed, dynamic)


def test_greedy_fast_path_equals_the_generic_loop_and_reads_live_weights() -> None:
    model = tiny("qwen2", num_key_value_heads=2)
    ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    free = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=10)
    stop = int(free[0, 3])
    kwargs = {"temperature": 0, "max_new_tokens": 10, "eos_token_ids": (stop,), "pad_token_id": 0}
    assert torch.equal(
        sample_tokens(model, ids, mask, **kwargs), sample_tokens(model, ids, mask, fast=False, **kwargs)
    )
    with torch.no_grad():  # the student changes between calls: the next samples follow the new weights
        model.lm_head.weight.mul_(-1.0)
    after = sample_tokens(model, ids, mask, **kwargs)
    assert torch.equal(after, sample_tokens(model, ids, mask, fast=False, **kwargs))
    assert not torch.equal(after[:, 0], free[:, 0])


def chi_square(counts: Tensor, probs: Tensor) -> tuple[float, int]:
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def peaked_model_and_exact_probabilities(
    temperature: float,
) -> tuple[torch.nn.Module, Tensor, Tensor, Tensor]:
    """A qwen3 model with a peaked head, a 5-token prompt, and the exact probabilities of the first
    and second sampled tokens at `temperature` (float64, from the model's forward)."""
    model = tiny("qwen3", seed=3, num_key_value_heads=2, head_dim=12)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked, far from uniform
    prompt = torch.randint(3, VOCAB, (5,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        p1 = torch.softmax(model(prompt[None]).logits[0, -1].double() / temperature, -1)
        seqs = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], 1)
        p2 = (p1[:, None] * torch.softmax(model(seqs).logits[:, -1].double() / temperature, -1)).sum(0)
    return model, prompt, p1, p2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_path_samples_follow_the_exact_distribution(temperature: float) -> None:
    """G samples of one prompt (shared prefill, GQA + q/k norms, lean path): token frequencies at
    steps 1 and 2 match softmax(logits / T) computed exactly from the model's forward."""
    model, prompt, p1, p2 = peaked_model_and_exact_probabilities(temperature)
    assert lean_decoder_support(model, 10) is None
    torch.manual_seed(0)
    n = 4000
    tokens = sample_tokens(
        model,
        prompt[None],
        torch.ones(1, 5, dtype=torch.long),
        temperature=temperature,
        max_new_tokens=2,
        num_samples=n,
    )
    for column, probs in ((0, p1), (1, p2)):
        stat, dof = chi_square(torch.bincount(tokens[:, column], minlength=VOCAB), probs)
        assert dof >= 5
        assert stat < dof + 6 * (2 * dof) ** 0.5, f"step {column + 1}: chi2 = {stat:.1f} with {dof} dof"


@pytest.mark.parametrize(
    "case",
    [
        "gpt2",
        "dynamic-rope",
        "short-window",
        "hook",
        "patched-forward",
        "subclass",
        "training-dropout",
        "peft-like",
    ],
)
def test_unsupported_models_fall_back_with_a_logged_reason(case: str, caplog) -> None:
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if case == "gpt2":
        config = AutoConfig.for_model(
            "gpt2", vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, eos_token_id=2
        )
        model = AutoModelForCausalLM.from_config(config).eval()
    elif case == "dynamic-rope":
        model = tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    elif case == "short-window":
        model = tiny("mistral", sliding_window=4)
    else:
        model = tiny("llama")
        if case == "hook":
            model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
        elif case == "patched-forward":  # what accelerate's offloading hooks do
            norm = model.model.norm
            norm.forward = lambda hidden, _forward=norm.forward: _forward(hidden)
        elif case == "subclass":

            class Custom(LlamaForCausalLM):
                pass

            model.__class__ = Custom
        elif case == "training-dropout":
            model.config.attention_dropout = 0.1
            model.train()
        else:  # an adapter wrapping a projection (what PEFT's LoRA does)

            class Adapter(nn.Linear):
                pass

            old = model.model.layers[1].self_attn.v_proj
            new = Adapter(old.in_features, old.out_features, bias=False)
            new.weight = old.weight
            model.model.layers[1].self_attn.v_proj = new
    reason = lean_decoder_support(model, 5 + 6)  # prompt width + new tokens, as sample_tokens asks
    assert reason is not None
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    generation._logged_fallbacks.clear()  # logged once per (class, reason) per process
    with caplog.at_level(logging.DEBUG, logger="kdkit.samplers.generation"):
        torch.manual_seed(0)
        fast = sample_tokens(model, ids, mask, max_new_tokens=6)
        torch.manual_seed(0)
        generic = sample_tokens(model, ids, mask, max_new_tokens=6, fast=False)
    assert torch.equal(fast, generic)  # the fallback is the generic loop itself
    logged = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1, logged  # once, not at every call


def test_bfloat16_lean_logits_stay_close_to_the_model() -> None:
    """16-bit models keep the model's order of roundings (no folded norm weights): the lean logits
    differ from the model's bfloat16 forward by rounding only."""
    model = tiny("qwen3", num_key_value_heads=2, head_dim=12).to(torch.bfloat16)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    decoder = LeanDecoder(model)
    with torch.no_grad():
        lean = [decoder.prefill(ids, mask, 2)]
        lean.append(decoder.step(lean[0].argmax(-1)))
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        ref0 = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids1 = torch.cat([ids, lean[0].argmax(-1)[:, None]], 1)
        mask1 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        ref1 = model(input_ids=ids1, attention_mask=mask1, position_ids=(mask1.cumsum(-1) - 1).clamp_min(0))
    for ours, ref in zip(lean, (ref0, ref1.logits[:, -1])):
        assert ours.dtype == torch.bfloat16
        scale = float(ref.float().abs().max())
        assert float((ours.float() - ref.float()).abs().max()) < 0.05 * scale


def test_right_padded_prompts_are_refused() -> None:
    """The generic loop continues from the last column: a right-padded prompt would be continued
    from a pad token. sample_tokens refuses it with a message naming the fix."""
    model = tiny("llama")
    ids = torch.randint(3, VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    for fast in (True, False):
        with pytest.raises(ValueError, match="left-padded"):
            sample_tokens(model, ids, mask, max_new_tokens=3, fast=fast)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_shape_step_runs_under_bf16_autocast(device: str) -> None:
    """Mixed-precision training samples inside autocast, where k / v come out in bf16 while the
    cache keeps the model's float32 (a defect: the in-place cache write refused the dtype, seen on
    an H200). The fixed-shape step (graphed on cuda, with autocast's casts recorded in the graph)
    gives the dynamic step's logits under the same autocast, to bf16 precision."""
    model = tiny("llama", num_key_value_heads=2).to(device)
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(9)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        fixed, dynamic = StaticStepDecoder(model, graph=True), LeanDecoder(model)
        logits = [(fixed.prefill(ids, mask, 6), dynamic.prefill(ids, mask, 6))]
        for _ in range(5):
            token = logits[-1][1].argmax(-1)
            logits.append((fixed.step(token), dynamic.step(token)))
    if device == "cuda":
        assert fixed.graph is not None, fixed.graph_failed
    for got, expected in logits:
        assert got.dtype == expected.dtype
        assert torch.allclose(got.float(), expected.float(), atol=0.1, rtol=0.05)


# -- decoders (and graphs) kept across sampling calls -------------------------------------------


def fixed_shape_tokens(model, ids, mask, seed: int, **kwargs) -> Tensor:
    torch.manual_seed(seed)
    return sample_tokens(model, ids, mask, graph_decode=True, **kwargs)


def fresh_tokens(model, ids, mask, seed: int, **kwargs) -> Tensor:
    """The same call on a copy of the model: a decoder (and graph) built for this call alone."""
    copy = copy_module.deepcopy(model)
    before = fast_decode.decoder_cache_info()["misses"]
    tokens = fixed_shape_tokens(copy, ids, mask, seed, **kwargs)
    assert fast_decode.decoder_cache_info()["misses"] == before + 1
    return tokens


def left_padded(widths: list[int], seed: int, device: str) -> tuple[Tensor, Tensor]:
    width = max(widths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(widths), width, dtype=torch.long)
    mask = torch.zeros(len(widths), width, dtype=torch.long)
    for i, n in enumerate(widths):
        ids[i, width - n :], mask[i, width - n :] = torch.randint(3, VOCAB, (n,), generator=g), 1
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_kept_decoder_draws_a_fresh_decoders_tokens(device: str) -> None:
    """One decoder (one graph on cuda) serves successive calls whose prompts differ, whose widths
    differ within one cache bucket, with G = 1 or 2 samples per prompt (the same 4 rows), greedy or
    sampled, rows ending at different steps: each call draws exactly the tokens a decoder built for
    it alone draws (and, greedy, the dynamic lean step's)."""
    fast_decode.clear_decoder_cache()
    model = tiny("qwen3", num_key_value_heads=2, head_dim=12).to(device)
    lengths: set[int] = set()
    cases = [
        ([5, 3, 5, 4], 1, 0.0),
        ([7, 7, 2, 6], 1, 1.0),
        ([6, 4], 2, 1.0),
        ([3, 6], 2, 0.0),
        ([5, 5, 5, 5], 1, 1.0),
    ]
    for i, (widths, samples, temperature) in enumerate(cases):
        ids, mask = left_padded(widths, seed=10 + i, device=device)
        kwargs = {
            "temperature": temperature,
            "max_new_tokens": 12,
            "eos_token_ids": (2, 5),
            "pad_token_id": 0,
            "num_samples": samples,
        }
        reused = fixed_shape_tokens(model, ids, mask, seed=i, **kwargs)
        assert torch.equal(reused, fresh_tokens(model, ids, mask, seed=i, **kwargs))
        if temperature == 0:
            assert torch.equal(reused, sample_tokens(model, ids, mask, graph_decode=False, **kwargs))
        lengths.update(generation.completion_lengths(reused, (2, 5)).tolist())
        assert fast_decode.decoder_cache_info(model) == {
            "hits": i,
            "misses": i + 2,
            "rebuilds": 0,
            "kept": 1,
        }  # (the counts are global: the misses are the first call and each fresh copy)
    assert len(lengths) > 2  # rows ended at different steps
    (decoder,) = fast_decode._decoders[model].values()
    assert decoder.prefills == len(cases) and decoder.visible.shape == (4, 32)
    if device == "cuda":
        assert decoder.graph is not None, decoder.graph_failed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "model-matrices"])
def test_a_kept_decoder_reads_in_place_weight_updates(device: str, fuse: bool, monkeypatch) -> None:
    """In-place updates between calls (`p.data.mul_` on a norm folded into a fused matrix, a q/k norm,
    an embedding; an AdamW step) keep the decoder (a hit, no rebuild) and the next call draws the
    new weights' tokens: those of a decoder built after the update."""
    if not fuse:
        monkeypatch.setattr(fast_decode, "FUSE_MAX_WIDTH", 0)
    fast_decode.clear_decoder_cache()
    model = tiny("qwen3", num_key_value_heads=2, head_dim=12).to(device)
    ids, mask = left_padded([6, 4, 5], seed=3, device=device)
    kwargs = {"temperature": 0.0, "max_new_tokens": 10, "eos_token_ids": (2,), "pad_token_id": 0}
    first = fixed_shape_tokens(model, ids, mask, seed=0, **kwargs)
    decoder = next(iter(fast_decode._decoders[model].values()))
    assert (decoder.layers[0].qkv.sources is not None) == fuse
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight.data.mul_(-2.0)
        layer.post_attention_layernorm.weight.data.mul_(3.0)
        layer.self_attn.q_norm.weight.data.mul_(0.5)
        model.model.embed_tokens.weight.data.mul_(1.5)
    second = fixed_shape_tokens(model, ids, mask, seed=0, **kwargs)
    assert torch.equal(second, fresh_tokens(model, ids, mask, seed=0, **kwargs))
    assert not torch.equal(second, first)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.3)
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.logsumexp(-1).sum().backward()
    optimizer.step()
    model.eval()
    third = fixed_shape_tokens(model, ids, mask, seed=0, **kwargs)
    assert torch.equal(third, fresh_tokens(model, ids, mask, seed=0, **kwargs))
    assert not torch.equal(third, second)
    assert torch.equal(third, sample_tokens(model, ids, mask, graph_decode=False, **kwargs))
    info = fast_decode.decoder_cache_info(model)
    assert (info["hits"], info["rebuilds"], info["kept"]) == (2, 0, 1)
    assert next(iter(fast_decode._decoders[model].values())) is decoder


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["load_state_dict-assign", "param.data"])
def test_a_replaced_parameter_storage_rebuilds_the_decoder(device: str, how: str) -> None:
    """`load_state_dict(assign=True)` or `param.data = new tensor` gives the model storages the kept
    decoder does not read: it is rebuilt, and the next call draws the new weights' tokens."""
    fast_decode.clear_decoder_cache()
    model = tiny("llama", num_key_value_heads=2).to(device)
    ids, mask = left_padded([5, 3], seed=4, device=device)
    kwargs = {"temperature": 0.0, "max_new_tokens": 8, "num_samples": 2}
    first = fixed_shape_tokens(model, ids, mask, seed=0, **kwargs)
    other = tiny("llama", seed=1, num_key_value_heads=2).to(device)
    if how == "param.data":
        for p, q in zip(model.parameters(), other.parameters()):
            p.data = q.detach().clone()
    else:
        model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    second = fixed_shape_tokens(model, ids, mask, seed=0, **kwargs)
    assert torch.equal(second, fixed_shape_tokens(other, ids, mask, seed=0, **kwargs))
    assert not torch.equal(second, first)
    assert fast_decode.decoder_cache_info(model) == {"hits": 0, "misses": 2, "rebuilds": 1, "kept": 1}


def test_the_decoder_cache_is_bounded_and_freed_with_its_model() -> None:
    """At most GRAPH_CACHE_SIZE decoders per model (the least recently used dropped); none kept
    once the model is deleted (the cache holds it weakly, the decoders only views of its tensors);
    a kept decoder refuses another shape with a clear error."""
    import gc
    import weakref

    fast_decode.clear_decoder_cache()
    model = tiny("llama", num_key_value_heads=2)
    ids, mask = left_padded([5, 4], seed=5, device="cpu")
    for new in (20, 40, 70, 100, 20):  # cache lengths 32, 64, 96, 128 (+5 prompt tokens), then 32
        sample_tokens(model, ids, mask, temperature=0.0, max_new_tokens=new, graph_decode=True)
    kept = fast_decode._decoders[model]
    assert len(kept) == fast_decode.GRAPH_CACHE_SIZE == 3
    assert sorted(key[1] for key in kept) == [32, 96, 128]  # 64, the least recently used, dropped
    assert fast_decode.decoder_cache_info(model)["misses"] == 5  # (32 was dropped before its reuse)
    decoder = next(iter(kept.values()))
    with pytest.raises(ValueError, match="built for 2 rows"):
        decoder.prefill(ids[:1], mask[:1], max_new_tokens=20)
    assert fast_decode.cache_length(5, 27) == 32 and fast_decode.cache_length(5, 28) == 64
    alive = weakref.ref(model)
    del model, kept, decoder
    gc.collect()
    assert alive() is None
    assert len(fast_decode._decoders) == 0 and fast_decode.decoder_cache_info()["kept"] == 0


def test_residual_stream_stays_float32_under_autocast(monkeypatch) -> None:
    """Hugging Face's layers add each block's bf16 output to a float32 residual under autocast; the
    lean step once fused that add into an autocast `addmm`, making the residual stream bf16 (a
    slightly different function to sample from). Every residual add must stay float32."""
    model = tiny("llama", num_key_value_heads=2)
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    seen: list[torch.dtype] = []
    linear = fast_decode._linear

    def spy(x, weight_t, bias, residual=None):
        out = linear(x, weight_t, bias, residual)
        if residual is not None:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(fast_decode, "_linear", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = LeanDecoder(model)
        token = decoder.prefill(ids, mask, 3).argmax(-1)
        decoder.step(token)
    assert seen and set(seen) == {torch.float32}, seen
