"""Teacher signals: each gives what it promises, computed without gradients."""

from __future__ import annotations

import torch

from kdkit.losses.tokens import first_trained_position, shift, token_log_probs
from kdkit.registry import TEACHER_SIGNALS, load_builtins
from kdkit.samplers import PromptCompletionCollator
from kdkit.signals import HiddenSignal, LogitsSignal, TokenLogprobsSignal
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

TOKENIZER = arithmetic_tokenizer()


def teacher():
    return build_arithmetic_lm(
        TOKENIZER, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=3
    )


def batch():
    return PromptCompletionCollator(TOKENIZER)(arithmetic_dataset(3, (1, 2), seed=0))


def test_builtin_signals_are_registered() -> None:
    load_builtins()
    assert {"logits", "hidden", "token_logprobs"} <= set(TEACHER_SIGNALS.names())


def test_logits_hidden_and_token_logprobs_agree() -> None:
    model, data = teacher().eval(), batch()
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    full = LogitsSignal()(data, teacher=model)  # from the first position that predicts a label
    assert full.start == first_trained_position(data["labels"])
    assert torch.allclose(full.logits, logits[:, full.start :], atol=1e-6) and not full.logits.requires_grad
    hidden = HiddenSignal()(data, teacher=model)
    assert hidden.head is not None and hidden.head.transform.is_identity
    assert torch.allclose(hidden.head.logits(hidden.hidden), logits, atol=1e-5)
    tokens = TokenLogprobsSignal()(data, teacher=model)
    shifted, targets, mask = shift(logits, data["labels"])
    assert torch.allclose(tokens.token_logprobs[mask], token_log_probs(shifted, targets)[mask], atol=1e-6)
    assert tokens.behaviour_logprobs is None  # dataset tokens: no behaviour policy to correct for


def test_a_scaled_head_is_reported() -> None:
    # a Cohere-style logit scale must reach the fused loss (the model applies it in forward)
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        logit_scale=0.5,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = CohereForCausalLM(config).eval()
    data = batch()
    target = HiddenSignal()(data, teacher=model)
    assert target.head.transform.scale == 0.5
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    assert torch.allclose(target.head.logits(target.hidden), logits, atol=1e-5)
