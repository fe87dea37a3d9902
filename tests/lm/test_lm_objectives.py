"""LM objectives and the LM distiller: masking, every divergence, sampled-token sign, CE, recipes."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.config import TrainConfig
from kdkit.losses import DIVERGENCES
from kdkit.methods.lm import LM_RECIPES, LMDistiller, LMRecipe
from kdkit.methods.lm_objectives import (
    completion_cross_entropy,
    discounted_returns,
    sampled_token_loss,
    token_divergence,
    token_log_probs,
)
from kdkit.registry import METHODS
from kdkit.samplers import (
    DatasetSampler,
    GenerationSettings,
    MixtureSampler,
    PromptCompletionCollator,
    StudentSampler,
)
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

TOKENIZER = arithmetic_tokenizer()
DIVERGENCE_KWARGS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "f": {"f": "js"}}


def tiny_lm(seed: int = 0, hidden: int = 16, vocab: int | None = None):
    model = build_arithmetic_lm(
        TOKENIZER, hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    )
    if vocab is not None:  # padded embedding, same tokenizer
        model.resize_token_embeddings(vocab)
    return model


def batch(n: int = 4, seed: int = 0):
    return PromptCompletionCollator(TOKENIZER)(arithmetic_dataset(n, (1, 2), seed=seed))


def gen_settings(max_new_tokens: int = 6) -> GenerationSettings:
    return GenerationSettings(temperature=1.0, max_new_tokens=max_new_tokens)


def test_prompt_and_padding_positions_get_no_gradient() -> None:
    data = batch()
    B, T = data["labels"].shape
    student = torch.randn(B, T, 16, requires_grad=True)
    loss = token_divergence(student, torch.randn(B, T, 16), data["labels"], divergence="fkl")
    loss.backward()
    grad_norm = student.grad.abs().sum(-1)  # [B, T]
    trained = torch.zeros(B, T, dtype=torch.bool)
    trained[:, :-1] = data["labels"][:, 1:] != -100  # position t predicts token t+1
    assert (grad_norm[~trained] == 0).all()
    assert (grad_norm[trained] > 0).all()


def test_mean_is_over_completion_tokens() -> None:
    data = batch(n=3)
    B, T = data["labels"].shape
    student, teacher = torch.randn(B, T, 16), torch.randn(B, T, 16)
    per_token = DIVERGENCES.get("fkl")(student[:, :-1], teacher[:, :-1], reduction="none")
    mask = data["labels"][:, 1:] != -100
    expected = per_token[mask].sum() / mask.sum()
    assert torch.allclose(token_divergence(student, teacher, data["labels"], divergence="fkl"), expected)


def test_padded_teacher_vocabulary_is_cut_to_the_shared_ids() -> None:
    data = batch()
    B, T = data["labels"].shape
    student, teacher = torch.randn(B, T, 16), torch.randn(B, T, 24)
    cut = token_divergence(student, teacher[..., :16], data["labels"], divergence="rkl")
    assert torch.allclose(token_divergence(student, teacher, data["labels"], divergence="rkl"), cut)


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_every_divergence_trains_the_student(name: str) -> None:
    student, teacher = tiny_lm(seed=0), tiny_lm(seed=1, hidden=24, vocab=20)
    distiller = LMDistiller(student, teacher, divergence=name, divergence_kwargs=DIVERGENCE_KWARGS.get(name))
    terms = distiller(batch())
    assert torch.isfinite(terms["kd"]) and terms["kd"] > 0
    terms["kd"].backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_sampled_token_gradient_raises_log_prob_where_the_teacher_agrees_more() -> None:
    labels = torch.tensor([[-100, 3, 4, 5]])
    logits = torch.randn(1, 4, 8, requires_grad=True)
    targets = labels[:, 1:]
    log_p_s = token_log_probs(logits[:, :-1], targets).detach()
    # teacher likes token 1 more than the student does, token 2 less, token 3 the same
    teacher_lp = log_p_s + torch.tensor([[1.0, -1.0, 0.0]])
    loss, diagnostics = sampled_token_loss(logits, teacher_lp, labels)
    loss.backward()
    with torch.no_grad():
        stepped = token_log_probs((logits - 0.1 * logits.grad)[:, :-1], targets)
    change = stepped - log_p_s
    assert change[0, 0] > 0 and change[0, 1] < 0
    assert torch.allclose(logits.grad[0, 2], torch.zeros(8))  # zero advantage, no push
    assert torch.isclose(diagnostics["log_ratio"], torch.tensor(0.0))  # mean of (-1, 1, 0)


def test_discounted_returns() -> None:
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert discounted_returns(values, mask, 0.0).tolist() == [[1.0, 2.0, 4.0, 0.0]]
    assert discounted_returns(values, mask, 0.5).tolist() == [[1.0 + 1.0 + 1.0, 2.0 + 2.0, 4.0, 0.0]]


def test_ce_weight_zero_gives_no_ce_term_and_ce_is_dataset_only() -> None:
    student, teacher = tiny_lm(0), tiny_lm(1)
    data = batch()
    assert "ce" not in LMDistiller(student, teacher, ce_weight=0.0)(data)
    with_ce = LMDistiller(student, teacher, ce_weight=0.5)(data)
    expected = completion_cross_entropy(student(input_ids=data["input_ids"]).logits, data["labels"])
    assert torch.allclose(with_ce["ce"], 0.5 * expected, atol=1e-5)
    assert torch.allclose(with_ce["_ce_raw"], expected, atol=1e-5)
    on_policy = LMDistiller(student, teacher, ce_weight=0.5, sampler=StudentSampler(**vars(gen_settings())))
    terms = on_policy(data)
    assert "ce" not in terms and terms["_on_policy"] == 1.0 and "kd" in terms


def test_diagnostics_are_detached_scalars() -> None:
    distiller = LMDistiller(tiny_lm(0), tiny_lm(1), ce_weight=1.0)
    data = batch()
    terms = distiller(data)
    diagnostics = {k: v for k, v in terms.items() if k.startswith("_")}
    assert {"_kd_raw", "_ce_raw", "_tokens", "_on_policy", "_gen_s"} <= set(diagnostics)
    assert all(v.ndim == 0 and not v.requires_grad for v in diagnostics.values())
    assert diagnostics["_tokens"] == (data["labels"][:, 1:] != -100).sum()
    assert terms["kd"].requires_grad and terms["ce"].requires_grad


def test_magnitude_warning(caplog) -> None:
    distiller = LMDistiller(tiny_lm(0), tiny_lm(1), kd_weight=1e-6, ce_weight=1.0)
    with caplog.at_level("WARNING"):
        distiller(batch())
    assert "differ by more than" in caplog.text


@pytest.mark.parametrize(("name", "kwargs"), [("fkl", {}), ("jsd", {"beta": 0.7})])
def test_fused_matches_materialised_logits(name: str, kwargs: dict) -> None:
    student, teacher = tiny_lm(0), tiny_lm(1, hidden=24, vocab=20)
    data = batch()
    plain = LMDistiller(student, teacher, divergence=name, divergence_kwargs=kwargs, ce_weight=1.0)(data)
    grads_plain = torch.autograd.grad(plain["kd"] + plain["ce"], list(student.parameters()))
    fused = LMDistiller(
        student, teacher, divergence=name, divergence_kwargs=kwargs, ce_weight=1.0, fused=True, chunk_size=5
    )(data)
    grads_fused = torch.autograd.grad(fused["kd"] + fused["ce"], list(student.parameters()))
    assert torch.allclose(plain["kd"], fused["kd"], atol=1e-5)
    assert torch.allclose(plain["ce"], fused["ce"], atol=1e-5)
    for a, b in zip(grads_plain, grads_fused):
        assert torch.allclose(a, b, atol=1e-5)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="teacher"):
        LMDistiller(tiny_lm(), None)
    with pytest.raises(ValueError, match="nothing to train"):
        LMDistiller(tiny_lm(), tiny_lm(1), kd_weight=0.0)
    with pytest.raises(KeyError, match="rkll"):
        LMDistiller(tiny_lm(), tiny_lm(1), divergence="rkll")
    with pytest.raises(ValueError, match="fused"):
        LMDistiller(tiny_lm(), tiny_lm(1), objective="sampled_token", fused=True)


def test_recipes_are_registered_and_build() -> None:
    expected = {
        "supervised_kd": "dataset",
        "seqkd": "teacher",
        "on_policy": "student",
        "sampled_token": "student",
    }
    for name in LM_RECIPES:
        assert name in METHODS and isinstance(METHODS.get(name), LMRecipe) and METHODS.describe(name)
    for name, source in expected.items():
        recipe = METHODS.get(name).replace(max_new_tokens=5)
        distiller = recipe.build(tiny_lm(0), tiny_lm(1), eos_token_id=TOKENIZER.eos_token_id)
        terms = distiller(batch())
        assert torch.isfinite(terms["kd"]), name
        assert terms["_on_policy"] == float(source == "student"), name
    gkd = METHODS.get("gkd").build(tiny_lm(0), tiny_lm(1))
    assert isinstance(gkd.sampler, MixtureSampler) and gkd.sampler.lmbda == 0.5
    assert gkd.divergence == "jsd" and gkd.divergence_kwargs == {"beta": 0.5}
    minillm = METHODS.get("minillm").replace(max_new_tokens=5, lmbda=0.0)  # teacher samples: IS weights
    terms = minillm.build(tiny_lm(0), tiny_lm(1))(batch())
    assert torch.isfinite(terms["kd"]) and "_log_ratio" in terms


def test_short_end_to_end_distillation_with_the_engine(tmp_path) -> None:
    from kdkit.engine import train

    teacher, student = tiny_lm(1, hidden=24), tiny_lm(0)
    distiller = LMDistiller(
        student,
        teacher,
        divergence="jsd",
        divergence_kwargs={"beta": 0.5},
        ce_weight=0.1,
        sampler=MixtureSampler(0.5, on_policy=StudentSampler(**vars(gen_settings(8))), off_policy=DatasetSampler(), seed=0),
    )
    before = [p.detach().clone() for p in student.parameters()]
    cfg = TrainConfig(
        steps=4, batch_size=4, lr=1e-2, log_every=1, checkpoint_every=4, progress=False, mixed_precision="no"
    )
    samples = arithmetic_dataset(32, (1, 2), seed=0)
    result = train(distiller, samples, cfg, tmp_path / "run", collate_fn=PromptCompletionCollator(TOKENIZER))
    assert result.steps == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all("kd" in r and "diag/tokens" in r for r in records)
    assert {r["diag/on_policy"] for r in records} == {0.0, 1.0}  # the seeded mixture drew both sources
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
