"""LM evaluation: perplexity, teacher agreement, log-likelihood of student samples, throughput."""

from __future__ import annotations

import math

import torch

from kdkit.eval.lm import generation_throughput, perplexity, sample_log_likelihoods, token_agreement
from kdkit.objectives.lm import completion_cross_entropy
from kdkit.samplers import GenerationSettings, PromptCompletionCollator
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

TOKENIZER = arithmetic_tokenizer()


def tiny_lm(seed: int = 0):
    return build_arithmetic_lm(
        TOKENIZER, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    )


def batches(n_batches: int = 2, size: int = 3):
    collate = PromptCompletionCollator(TOKENIZER)
    return [collate(arithmetic_dataset(size, (1, 3), seed=i)) for i in range(n_batches)]


def test_perplexity_is_token_weighted() -> None:
    model = tiny_lm().train()
    data = batches()
    result = perplexity(model, data)
    with torch.no_grad():
        nll_sum = sum(
            float(completion_cross_entropy(model.eval()(input_ids=b["input_ids"]).logits, b["labels"]))
            * int((b["labels"][:, 1:] != -100).sum())
            for b in data
        )
    tokens = sum(int((b["labels"] != -100).sum()) for b in data)
    assert result["tokens"] == tokens
    assert math.isclose(result["nll"], nll_sum / tokens, rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(result["nll"]), rel_tol=1e-9)
    assert 1.0 < result["perplexity"] < 100.0


def test_token_agreement_is_one_with_itself_and_lower_with_another_model() -> None:
    model, other = tiny_lm(0), tiny_lm(1)
    with torch.no_grad():  # at init a tied-embedding LM predicts "repeat the input": make them differ
        for parameter in other.parameters():
            parameter.add_(torch.randn_like(parameter))
    data = batches()
    assert token_agreement(model, model, data)["agreement"] == 1.0
    result = token_agreement(model, other, data)
    assert 0.0 <= result["agreement"] < 1.0 and 0.0 <= result["student_accuracy"] <= 1.0


def test_sample_log_likelihoods_estimate_reverse_kl() -> None:
    model, other = tiny_lm(0), tiny_lm(1)
    settings = GenerationSettings(temperature=1.0, max_new_tokens=8)
    same = sample_log_likelihoods(model, model, batches(), settings)
    assert same["tokens"] > 0 and math.isclose(same["rkl_estimate"], 0.0, abs_tol=1e-5)
    assert same["student_logp"] < 0
    torch.manual_seed(0)
    different = sample_log_likelihoods(model, other, batches(4, 4), settings)
    assert math.isclose(
        different["rkl_estimate"], different["student_logp"] - different["teacher_logp"], rel_tol=1e-9
    )
    assert different["rkl_estimate"] > 0  # KL(p_S ‖ p_T) on the student's own samples


def test_generation_throughput() -> None:
    model = tiny_lm()
    data = batches(1, 4)[0]
    result = generation_throughput(model, data["prompt_ids"], data["prompt_attention_mask"], max_new_tokens=6)
    assert result["new_tokens"] == 24 and result["tokens_per_s"] > 0
