"""kdkit's own decode loop: any of several EOS ids ends a row, the model's generation_config does
not leak into sampling, samples follow softmax(logits / T) (and its top-p nucleus), finished rows
are dropped, and G samples of one prompt share its prefill."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kdkit.samplers import IGNORE_INDEX, PromptCompletionCollator
from kdkit.samplers.fast_decode import lean_decoder_support
from kdkit.samplers.generation import (
    GenerationSettings,
    completion_lengths,
    eos_token_ids,
    generate_batch,
    repeat_rows,
    sample_from_logits,
    sample_tokens,
)
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm


@pytest.fixture(scope="module")
def tokenizer():
    return arithmetic_tokenizer()


def peaked_lm(tokenizer, seed: int = 0):
    """A tiny Llama whose next-token distributions are far from uniform (a scaled-up head)."""
    model = build_arithmetic_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    ).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def prompts(tokenizer, n: int, seed: int = 0) -> dict[str, Tensor]:
    return PromptCompletionCollator(tokenizer)(arithmetic_dataset(n, (1, 3), seed=seed))


def chi_square(counts: Tensor, probs: Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` (bins with expected count < 5 pooled), dof."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def assert_matches(counts: Tensor, probs: Tensor) -> None:
    stat, dof = chi_square(counts, probs)
    # dof + 6·sqrt(2·dof): a false alarm far below 1e-4 for these dof; a wrong distribution of this
    # kind gives statistics in the hundreds to thousands.
    assert dof >= 1, "the distribution under test is (nearly) deterministic"
    assert stat < dof + 6 * (2 * dof) ** 0.5, f"chi2 = {stat:.1f} with {dof} dof"


def two_step_probs(model, prompt: Tensor, temperature: float, top_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact P(first token) [V] and P(second token) [V] = Σ_t1 P(t1)·P(t2 | t1), nucleus applied."""

    def dist(logits: Tensor) -> Tensor:
        p = torch.softmax(logits.double() / temperature, -1)
        if top_p < 1.0:
            sorted_p, order = p.sort(-1, descending=True)
            sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0
            p = torch.zeros_like(p).scatter(-1, order, sorted_p)
            p = p / p.sum(-1, keepdim=True)
        return p

    with torch.no_grad():
        p1 = dist(model(prompt[None]).logits[0, -1])
        vocab = p1.shape[0]
        seqs = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab, device=prompt.device)[:, None]], 1)
        p2 = (p1[:, None] * dist(model(seqs).logits[:, -1])).sum(0)
    return p1, p2


def test_any_of_several_eos_ids_ends_a_row(tokenizer) -> None:
    model = peaked_lm(tokenizer, seed=4)
    data = prompts(tokenizer, 6, seed=3)
    greedy = sample_tokens(
        model, data["prompt_ids"], data["prompt_attention_mask"], temperature=0, max_new_tokens=8
    )
    stop = int(greedy[0, 2])  # row 0's third token: an id the model really produces
    # The list form of generation_config (Llama-3 / Qwen chat models); the real stop id comes second.
    model.generation_config.eos_token_id = [10**6, stop]
    assert eos_token_ids(model) == (10**6, stop)
    out, info = generate_batch(
        model,
        data["prompt_ids"],
        data["prompt_attention_mask"],
        GenerationSettings(temperature=0, max_new_tokens=8),
    )
    expected = completion_lengths(greedy, (10**6, stop))
    assert int(expected[0]) <= 3  # row 0 stops at (or before) its third token
    for i in range(6):
        trained = out["labels"][i][out["labels"][i] != IGNORE_INDEX]
        assert trained.tolist() == greedy[i, : int(expected[i])].tolist()  # nothing after the stop id
    assert info["truncated"] == int((~torch.isin(greedy, torch.tensor([stop]))).all(1).sum())


def test_completion_lengths_accepts_several_ids() -> None:
    new = torch.tensor([[5, 3, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [9, 9, 3, 0]])
    assert completion_lengths(new, (2, 3)).tolist() == [2, 4, 1, 3]
    assert completion_lengths(new, 2).tolist() == [4, 4, 1, 4]


def test_settings_take_an_int_or_a_list_of_eos_ids(tokenizer) -> None:
    model = peaked_lm(tokenizer)
    assert eos_token_ids(model, 7) == (7,) and eos_token_ids(model, [7, 9]) == (7, 9)
    assert eos_token_ids(model) == (tokenizer.eos_token_id,)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0.0)


DECODE_PATHS = [
    pytest.param("cpu", None, id="cpu-lean"),
    pytest.param("cpu", True, id="cpu-fixed-shape"),
    pytest.param(
        "cuda",
        None,
        id="cuda-graph",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.mark.parametrize(("device", "graph_decode"), DECODE_PATHS)
@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (1.3, 0.9)])
def test_samples_follow_the_model_not_its_generation_config(
    tokenizer, temperature: float, top_p: float, device: str, graph_decode: bool | None
) -> None:
    """An instruct model's generation_config (repetition penalty, min_p, top_k, no-repeat n-grams)
    must not change on-policy samples: token frequencies at steps 1 and 2 match the model's own
    softmax(logits / T) (top-p nucleus when set), computed exactly. Through the dynamic lean step,
    the fixed-shape step, and (on cuda, by default) its CUDA graph, there sampled by a decoder (and
    graph) kept from an earlier call whose weights have changed since (the reused path)."""
    from kdkit.samplers import fast_decode

    model = peaked_lm(tokenizer, seed=1).to(device)
    gc = model.generation_config
    gc.repetition_penalty, gc.min_p, gc.top_k, gc.no_repeat_ngram_size = 10.0, 0.2, 3, 1
    gc.do_sample, gc.temperature = True, 0.3
    data = prompts(tokenizer, 1, seed=5)
    prompt = data["prompt_ids"][0]
    assert lean_decoder_support(model, prompt.shape[0] + 2) is None  # sampled through the lean path
    prompt = prompt.to(device)
    n = 3000

    def sample() -> Tensor:
        return sample_tokens(
            model,
            prompt.repeat(n, 1),
            torch.ones(n, prompt.shape[0], dtype=torch.long, device=device),
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=2,
            eos_token_ids=(),
            graph_decode=graph_decode,
        ).cpu()

    fixed_shape = not (device == "cpu" and graph_decode is None)
    if fixed_shape:  # an earlier call builds (and on cuda captures) the decoder, with other weights
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        sample()
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(saved[k])
    p1, p2 = (p.cpu() for p in two_step_probs(model, prompt, temperature, top_p))
    before = fast_decode.decoder_cache_info(model)
    torch.manual_seed(0)
    tokens = sample()
    after = fast_decode.decoder_cache_info(model)
    assert after["hits"] - before["hits"] == (1 if fixed_shape else 0)
    assert after["kept"] == (1 if fixed_shape else 0)
    if device == "cuda":  # sampled through a replayed CUDA graph, not an eager fallback
        made = list(fast_decode._decoders[model].values())
        assert made[0].graph is not None, made[0].graph_failed
    vocab = p1.shape[0]
    assert_matches(torch.bincount(tokens[:, 0], minlength=vocab), p1)
    assert_matches(torch.bincount(tokens[:, 1], minlength=vocab), p2)


def test_shared_prefill_samples_match_independent_prompts(tokenizer) -> None:
    """num_samples=G: rows i·G..i·G+G−1 continue prompt i; greedy equals G copies of one sample,
    and sampled rows follow each prompt's own distribution."""
    model = peaked_lm(tokenizer, seed=2)
    data = prompts(tokenizer, 3, seed=7)
    ids, mask = data["prompt_ids"], data["prompt_attention_mask"]
    single = sample_tokens(
        model, ids, mask, temperature=0, max_new_tokens=6, eos_token_ids=(tokenizer.eos_token_id,)
    )
    grouped = sample_tokens(
        model,
        ids,
        mask,
        temperature=0,
        max_new_tokens=6,
        eos_token_ids=(tokenizer.eos_token_id,),
        num_samples=4,
    )
    assert torch.equal(grouped[:, : single.shape[1]], single.repeat_interleave(4, 0))
    settings = GenerationSettings(temperature=1.0, max_new_tokens=6, num_samples=4)
    out, info = generate_batch(model, ids, mask, settings)
    assert out["input_ids"].shape[0] == 12 and torch.equal(out["prompt_ids"], ids.repeat_interleave(4, 0))
    for row in range(12):
        prompt = ids[row // 4][mask[row // 4].bool()]
        assert torch.equal(out["input_ids"][row, : prompt.shape[0]], prompt)
    # first tokens of G = 2000 samples of prompt 1 follow its distribution
    torch.manual_seed(3)
    first = sample_tokens(model, ids[1:2], mask[1:2], temperature=1.0, max_new_tokens=1, num_samples=2000)
    p1, _ = two_step_probs(model, ids[1][mask[1].bool()], 1.0)
    assert_matches(torch.bincount(first[:, 0], minlength=p1.shape[0]), p1)
    assert repeat_rows({"digits": torch.tensor([1, 2]), "source": "x"}, 2)["digits"].tolist() == [1, 1, 2, 2]


def test_finished_rows_are_dropped_and_stay_padded(tokenizer) -> None:
    """Dropping finished rows from the cache does not change any other row (greedy = HF generate)."""
    model = peaked_lm(tokenizer, seed=4)
    data = prompts(tokenizer, 6, seed=3)
    ids, mask = data["prompt_ids"], data["prompt_attention_mask"]
    free = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=8)
    stop = int(free[0, 1])
    ours = sample_tokens(
        model, ids, mask, temperature=0, max_new_tokens=8, eos_token_ids=(stop,), pad_token_id=0
    )
    lengths = completion_lengths(free, stop)
    for i in range(6):
        n = int(lengths[i])
        assert ours[i, :n].tolist() == free[i, :n].tolist()
        assert (ours[i, n:] == 0).all()
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=stop,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    assert torch.equal(ours, reference[:, : ours.shape[1]])


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = torch.stack([sample_from_logits(logits, 1.0, top_p=0.75) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.75 <= 0.8: tokens 0 and 1 only
    assert sample_from_logits(logits, 0.0).tolist() == [0]


def test_registered_student_sampler_takes_num_samples(tokenizer) -> None:
    """`num_samples: G` in a method's parameters: G completions per prompt, dataset fields repeated."""
    from kdkit.samplers import StudentSampler
    from kdkit.samplers.base import GenerationParams

    model = peaked_lm(tokenizer, seed=2)
    data = prompts(tokenizer, 3, seed=7)
    sampler = StudentSampler(GenerationParams(max_new_tokens=6, num_samples=2))
    out = sampler(data, student=model, teacher=None)
    assert out["input_ids"].shape[0] == 6 and out["labels"].shape[0] == 6
    assert out["digits"].tolist() == data["digits"].repeat_interleave(2).tolist()
    assert torch.equal(out["prompt_ids"], data["prompt_ids"].repeat_interleave(2, 0))


FAMILIES = {
    "gpt2": {"n_embd": 16, "n_layer": 1, "n_head": 2},
    "qwen2": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
    "gemma2": {  # sliding-window layers, soft-capped logits
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "sliding_window": 4,
    },
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_greedy_decode_loop_equals_generate_across_families(model_type: str) -> None:
    """Cache handling, positions under left padding and row dropping agree with HF generate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"intermediate_size": 32} if model_type != "gpt2" else {}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=50,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **FAMILIES[model_type],
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    free = sample_tokens(model, ids, mask, temperature=0, max_new_tokens=8)
    stop = int(free[1, 2])  # ends row 1 early: the other rows continue after it is dropped
    ours = sample_tokens(
        model, ids, mask, temperature=0, max_new_tokens=8, eos_token_ids=(stop,), pad_token_id=0
    )
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=stop,
        pad_token_id=0,
    )[:, ids.shape[1] :]
    assert torch.equal(ours, reference[:, : ours.shape[1]])
    assert int(completion_lengths(ours, stop)[1]) <= 3
