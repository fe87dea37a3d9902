"""The DP-SGD engine mode: ε in the logs equals the accountant's, privacy.json, resume, LoRA, errors."""

import json

import pytest
import torch
from torch import nn

from kdkit.engine.distiller import Distiller
from kdkit.engine.private import (
    PrivacyConfig,
    UnsupportedLayerError,
    plan_privacy,
    poisson_batch,
    train_private,
)
from kdkit.engine.settings import TrainConfig
from kdkit.methods.private_distiller import PrivateLMDistiller
from kdkit.privacy import epsilon
from kdkit.privacy.statement import privacy_markdown
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.samplers.generation import GenerationSettings
from kdkit.settings import ConfigError


def _cfg(**kw):
    base = dict(steps=4, batch_size=8, lr=1e-2, log_every=2, checkpoint_every=2, progress=False,
                mixed_precision="no", seed=5)
    return TrainConfig(**(base | kw))


def _opd(tiny_lm, tokenizer):
    settings = GenerationSettings(max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    return PrivateLMDistiller(tiny_lm(2), tiny_lm(1), mode="opd", generation=settings)


def test_logged_epsilon_is_the_accountants(tiny_lm, tokenizer, records, tmp_path):
    privacy = PrivacyConfig(noise_multiplier=1.2, max_grad_norm=0.5, accountant="rdp")
    distiller = _opd(tiny_lm, tokenizer)
    result = train_private(distiller, records, _cfg(), privacy, tmp_path,
                           collate_fn=PromptCompletionCollator(tokenizer))
    assert not any(hasattr(p, "grad_sample") for p in distiller.parameters())  # Opacus state removed
    q, delta = 8 / len(records), 1 / len(records)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    for line in lines:
        assert line["privacy/epsilon"] == pytest.approx(epsilon(q, 1.2, line["step"], delta))
        assert line["privacy/delta"] == delta
    assert result.epsilon == pytest.approx(epsilon(q, 1.2, 4, delta))
    statement = json.loads((tmp_path / "privacy.json").read_text())
    assert statement["epsilon"] == pytest.approx(result.epsilon)
    assert "teacher" in statement["not_covered"][0] and "Poisson" in statement["sampling_scheme"]
    assert statement["parameters"]["noise_multiplier"] == 1.2
    text = privacy_markdown(statement)
    assert f"ε, δ) = ({result.epsilon:.3g}" in text and "Not covered" in text and "σ = 1.2" in text


def test_target_epsilon_sets_sigma_and_is_met(tiny_lm, tokenizer, records):
    plan = plan_privacy(PrivacyConfig(target_epsilon=2.0, accountant="prv"), len(records), _cfg(steps=30))
    assert plan.planned_epsilon <= 2.0
    assert epsilon(plan.sample_rate, plan.noise_multiplier, 30, plan.delta, "prv") == pytest.approx(
        plan.planned_epsilon)
    with pytest.raises(ConfigError, match="1/N"):
        plan_privacy(PrivacyConfig(target_epsilon=2.0, delta=0.5), len(records), _cfg())
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyConfig(noise_multiplier=1.0, target_epsilon=2.0)


def test_poisson_batches_have_rate_q_and_depend_on_seed_and_step():
    sizes = [len(poisson_batch(1000, 0.05, seed=0, step=s)) for s in range(200)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 3 * (1000 * 0.05 * 0.95 / 200) ** 0.5 + 1
    assert len(set(sizes)) > 5  # batch sizes vary
    assert poisson_batch(1000, 0.05, 0, 3) == poisson_batch(1000, 0.05, 0, 3)
    assert poisson_batch(1000, 0.05, 0, 3) != poisson_batch(1000, 0.05, 0, 4)


def test_resume_equals_an_uninterrupted_run(tiny_lm, tokenizer, records, tmp_path, monkeypatch):
    import kdkit.engine.private as private

    privacy = PrivacyConfig(noise_multiplier=1.0, max_grad_norm=0.5)
    collate = PromptCompletionCollator(tokenizer)
    whole = _opd(tiny_lm, tokenizer)
    train_private(whole, records, _cfg(), privacy, tmp_path / "a", collate_fn=collate)

    save = private._save

    def save_then_die(run_dir, cfg, distiller, optimizer, scheduler, step, *args):
        save(run_dir, cfg, distiller, optimizer, scheduler, step, *args)
        if step == 2:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")

    monkeypatch.setattr(private, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_private(_opd(tiny_lm, tokenizer), records, _cfg(), privacy, tmp_path / "b", collate_fn=collate)
    monkeypatch.setattr(private, "_save", save)
    resumed = _opd(tiny_lm, tokenizer)
    result = train_private(resumed, records, _cfg(), privacy, tmp_path / "b", collate_fn=collate, resume=True)
    assert result.resumed_from == 2
    assert result.epsilon == pytest.approx(epsilon(8 / len(records), 1.0, 4, 1 / len(records)))
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_lora_student_trains_only_adapters(tiny_lm, tokenizer, records, tmp_path):
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(tiny_lm(2), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    distiller = PrivateLMDistiller(student, tiny_lm(1), mode="kd")
    result = train_private(distiller, records, _cfg(steps=2), PrivacyConfig(noise_multiplier=1.0), tmp_path,
                           collate_fn=PromptCompletionCollator(tokenizer))
    assert result.steps == 2
    after = dict(student.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in before.items())


class _BatchNormStudent(Distiller):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), None)

    def forward(self, batch):
        return {"mse": (self.student(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()}


def test_a_layer_that_mixes_examples_is_refused_by_name(tmp_path):
    data = [{"x": torch.randn(3), "y": torch.randn(())} for _ in range(32)]
    with pytest.raises(UnsupportedLayerError, match="BatchNorm"):
        train_private(_BatchNormStudent(), data, _cfg(), PrivacyConfig(noise_multiplier=1.0), tmp_path)


def test_a_layer_without_the_batch_dimension_is_named(tokenizer, records, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2,
                                          n_positions=64, pad_token_id=0, eos_token_id=2, bos_token_id=1))

    distiller = PrivateLMDistiller(gpt2(0), None, mode="ft")
    with pytest.raises(UnsupportedLayerError, match="wpe"):
        train_private(distiller, records, _cfg(), PrivacyConfig(noise_multiplier=1.0), tmp_path,
                      collate_fn=PromptCompletionCollator(tokenizer))
    frozen = gpt2(0)
    frozen.transformer.wpe.weight.requires_grad_(False)  # the documented workaround
    result = train_private(PrivateLMDistiller(frozen, None, mode="ft"), records, _cfg(steps=2),
                           PrivacyConfig(noise_multiplier=1.0), tmp_path / "frozen",
                           collate_fn=PromptCompletionCollator(tokenizer))
    assert result.steps == 2


def test_physical_chunks_give_the_same_update_as_one_batch(tiny_lm, tokenizer, records, tmp_path):
    collate = PromptCompletionCollator(tokenizer)
    weights = []
    for chunk in (None, 3):
        distiller = PrivateLMDistiller(tiny_lm(2), tiny_lm(1), mode="kd")
        privacy = PrivacyConfig(noise_multiplier=0.7, max_grad_norm=0.01, max_physical_batch_size=chunk)
        train_private(distiller, records, _cfg(steps=2), privacy, tmp_path / str(chunk), collate_fn=collate)
        weights.append(distiller.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=1e-4, atol=1e-6)


def test_a_teacher_with_another_vocabulary_is_refused(tiny_lm):
    teacher = tiny_lm(1)
    teacher.resize_token_embeddings(40)
    with pytest.raises(ValueError, match="logits per token"):
        PrivateLMDistiller(tiny_lm(2), teacher, mode="kd")
