"""`fused: auto` (the default): the fused loss whenever it reproduces both heads, else the logits.

Also the PEFT case: the fused loss must run the adapted decoder (LoRA layers included), not the
whole wrapped causal LM as if it were the backbone (a defect: `.last_hidden_state` then failed)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from kdkit.methods.base import divergence_signal, lm_method, resolve_fused
from kdkit.models.heads import backbone_and_head, fused_loss_support
from kdkit.settings import LMContext
from tests.lm.test_lm_objectives import batch, divergence_distiller, tiny_lm


def test_auto_is_the_default_and_resolves_to_fused_for_causal_lms() -> None:
    method = lm_method("supervised_kd")
    params = method.params({})
    assert params.fused == "auto"
    resolved = resolve_fused(params, tiny_lm(0), tiny_lm(1))
    assert resolved.fused is True and divergence_signal(resolved) == "hidden"
    distiller = method.build(params, tiny_lm(0), tiny_lm(1), LMContext())
    assert type(distiller.signal).__name__ == "HiddenSignal"


def test_auto_falls_back_to_logits_when_a_head_cannot_be_projected() -> None:
    class Opaque(nn.Module):  # a teacher with logits but no Hugging Face backbone/head
        def forward(self, input_ids, attention_mask=None):  # pragma: no cover - never run here
            raise AssertionError

    params = lm_method("gkd").params({"lmbda": 0.5})
    assert fused_loss_support(Opaque(), "teacher") is not None
    assert resolve_fused(params, tiny_lm(0), Opaque()).fused is False
    assert resolve_fused(params, tiny_lm(0), None).fused is False
    # explicit choices are kept as given
    assert resolve_fused(lm_method("gkd").params({"fused": False}), tiny_lm(0), tiny_lm(1)).fused is False
    assert divergence_signal(lm_method("supervised_kd").params({"fused": False})) == "logits"


def test_auto_with_a_cache_reads_the_cache_and_true_with_a_cache_is_refused() -> None:
    params = lm_method("supervised_kd").params({"cache": "somewhere"})
    assert divergence_signal(params) == "cache"
    with pytest.raises(ValueError, match="fused and cache exclude each other"):
        lm_method("supervised_kd").params({"cache": "somewhere", "fused": True})


def test_fused_loss_runs_a_peft_students_adapted_decoder() -> None:
    student = get_peft_model(
        tiny_lm(0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    backbone, _ = backbone_and_head(student)
    assert any("lora" in name for name, _ in backbone.named_modules())  # the adapted decoder itself
    teacher, data = tiny_lm(1), batch(4)
    plain = divergence_distiller(student, teacher, "jsd", beta=0.3, fused=False)(data)
    fused = divergence_distiller(student, teacher, "jsd", beta=0.3, fused=True, chunk_size=5)(data)
    assert torch.allclose(plain["kd"], fused["kd"], atol=1e-5)
    trainable = [p for p in student.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(plain["kd"], trainable), torch.autograd.grad(fused["kd"], trainable)):
        assert torch.allclose(a, b, atol=1e-5)
