"""Post-head logit transforms (Cohere, Granite, Gemma 2): read off the model, applied by the fused loss.

The fused loss (hidden states @ head weight, chunked) must equal the divergence of the models' own
logits (Hugging Face applies the transforms in forward) in value and in every student gradient."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM

from kdkit.losses import DIVERGENCES
from kdkit.losses.fused import LinearHead, LogitTransform, fused_causal_lm_losses
from kdkit.models.heads import UnsupportedHeadError, backbone_and_head, head_transform

VOCAB = 96

# Tiny configs of three families with a post-head transform, strong enough to matter.
FAMILIES: dict[str, dict[str, Any]] = {
    "cohere": {"logit_scale": 0.35},
    "granite": {"logits_scaling": 0.4},  # divides: logits x 2.5
    "gemma2": {"final_logit_softcapping": 2.0, "attn_logit_softcapping": 50.0, "head_dim": 8},
}


def tiny(model_type: str, seed: int) -> torch.nn.Module:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **FAMILIES[model_type],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # logits of several units, so a soft-cap at 2 and the scales bite
        model.get_output_embeddings().weight.normal_(0.0, 1.5)
    return model


def batch(seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 10), generator=gen)
    attention = torch.ones_like(ids)
    attention[2, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[2, 7:] = -100  # padding
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def unfused(
    student, teacher, data, divergence: str, temperature: float, ce_weight: float, **kw: Any
) -> Tensor:
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    logits = student(**inputs).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    targets = data["labels"][:, 1:]
    mask = targets != -100
    loss = DIVERGENCES.get(divergence)(logits, t_logits, temperature=temperature, mask=mask, **kw)
    if ce_weight:
        loss = loss + ce_weight * torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    return loss


def fused(student, teacher, data, divergence: str, temperature: float, ce_weight: float, **kw: Any):
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    backbone, head = backbone_and_head(student)
    t_backbone, t_head = backbone_and_head(teacher)
    with torch.no_grad():
        t_hidden = t_backbone(**inputs).last_hidden_state
    hidden = backbone(**inputs).last_hidden_state
    return fused_causal_lm_losses(
        hidden,
        head,
        t_hidden,
        t_head,
        data["labels"],
        divergence=divergence,
        temperature=temperature,
        ce_weight=ce_weight,
        chunk_size=7,
        **kw,
    )


def assert_close(got: Tensor, expected: Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)


def test_transforms_are_read_off_the_config() -> None:
    assert head_transform(tiny("cohere", 0)) == LogitTransform(scale=0.35)
    assert head_transform(tiny("granite", 0)) == LogitTransform(scale=2.5)
    assert head_transform(tiny("gemma2", 0)) == LogitTransform(softcap=2.0)
    llama = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    assert head_transform(llama).is_identity
    # the model's own logits are the transform of hidden @ W
    model = tiny("gemma2", 1)
    data = batch()
    backbone, head = backbone_and_head(model)
    with torch.no_grad():
        inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
        assert_close(head.logits(backbone(**inputs).last_hidden_state), model(**inputs).logits)


def test_an_unknown_transform_is_refused_naming_the_attribute() -> None:
    config = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    config.output_multiplier = 0.2  # e.g. muse_spark's; kdkit does not know what it does
    with pytest.raises(UnsupportedHeadError, match="output_multiplier=0.2"):
        head_transform(config)
    config = AutoConfig.for_model("recurrent_gemma", vocab_size=VOCAB)
    with pytest.raises(UnsupportedHeadError, match="logits_soft_cap"):
        head_transform(config)


PAIRS = [("cohere", "granite"), ("granite", "gemma2"), ("gemma2", "cohere"), ("gemma2", "gemma2")]
CASES = [
    ("fkl", {}, 1.0, 0.0),
    ("rkl", {}, 2.0, 0.0),
    ("jsd", {"beta": 0.3}, 1.0, 0.5),  # CE folded into the closed form (temperature 1)
    ("jsd", {"beta": 0.5}, 1.7, 0.5),  # CE on its own log-softmax (temperature != 1)
    ("tvd", {}, 1.0, 0.3),  # local autograd through the divergence, slope of the transform after
]


@pytest.mark.parametrize(("student_type", "teacher_type"), PAIRS, ids=str)
@pytest.mark.parametrize(("divergence", "kwargs", "temperature", "ce_weight"), CASES, ids=str)
def test_fused_equals_the_models_own_logits(
    student_type: str, teacher_type: str, divergence: str, kwargs: dict, temperature: float, ce_weight: float
) -> None:
    student, teacher = tiny(student_type, 0), tiny(teacher_type, 1)
    data = batch()
    params = [p for p in student.parameters() if p.requires_grad]
    expected = unfused(student, teacher, data, divergence, temperature, ce_weight, **kwargs)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    got = fused(student, teacher, data, divergence, temperature, ce_weight, **kwargs)
    got_grads = torch.autograd.grad(got.loss, params, allow_unused=True)
    assert_close(got.loss, expected)
    for g_fused, g_ref in zip(got_grads, expected_grads, strict=True):
        if g_ref is None:
            assert g_fused is None or g_fused.abs().max() == 0
        else:
            assert_close(g_fused, g_ref)
    assert expected.abs() > 1e-3


def test_ignoring_the_transform_would_be_caught() -> None:
    """The comparison above has teeth: with identity heads the fused value is clearly different."""
    student, teacher = tiny("gemma2", 0), tiny("cohere", 1)
    data = batch()
    expected = unfused(student, teacher, data, "fkl", 1.0, 0.0)
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    (backbone, head), (t_backbone, t_head) = backbone_and_head(student), backbone_and_head(teacher)
    plain = fused_causal_lm_losses(
        backbone(**inputs).last_hidden_state,
        LinearHead(head.weight, head.bias),
        t_backbone(**inputs).last_hidden_state,
        LinearHead(t_head.weight, t_head.bias),
        data["labels"],
        divergence="fkl",
    )
    assert (plain.loss - expected).abs() > 0.05


def test_parts_are_reported_and_ce_alone_matches() -> None:
    student, teacher = tiny("granite", 0), tiny("granite", 1)
    data = batch(1)
    out = fused(student, teacher, data, "rkl", 1.0, 0.0)
    div = unfused(student, teacher, data, "rkl", 1.0, 0.0)
    ce = unfused(student, teacher, data, "rkl", 1.0, 1.0) - div
    assert_close(out.divergence, div.detach())
    assert_close(out.ce, ce.detach())  # reported even with ce_weight 0
    assert_close(out.loss, div)  # ... but not in the loss
    assert not out.divergence.requires_grad and not out.ce.requires_grad
