"""LM objectives and the LM distiller: masking, every divergence, sampled-token sign, CE, methods."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.config import TrainConfig
from kdkit.losses import DIVERGENCES
from kdkit.losses.tokens import token_log_probs
from kdkit.methods import LMDistiller, LMMethod
from kdkit.objectives.lm import (
    DivergenceObjective,
    DivergenceParams,
    SampledTokenObjective,
    completion_cross_entropy,
    discounted_returns,
    sampled_token_loss,
)
from kdkit.objectives.lm import token_divergence as _token_divergence
from kdkit.registry import METHODS
from kdkit.samplers import (
    DatasetSampler,
    GenerationSettings,
    MixtureSampler,
    PromptCompletionCollator,
    StudentSampler,
)
from kdkit.settings import LMContext
from kdkit.signals import HiddenSignal, TokenLogprobsSignal
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

TOKENIZER = arithmetic_tokenizer()
TOKENIZERS = (TOKENIZER, TOKENIZER)
CTX = LMContext.from_tokenizer(TOKENIZER)


def token_divergence(student, teacher, labels, *, divergence="fkl", temperature=1.0, **kwargs):
    params = DivergenceParams(divergence=divergence, temperature=temperature, **kwargs)
    return _token_divergence(student, teacher, labels, params)


def divergence_distiller(student, teacher, name="fkl", *, fused=False, chunk_size=None, **kwargs):
    """LMDistiller minimising divergence `name` (its own params and LMDistiller options in kwargs)."""
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in DIVERGENCES.params(name)}
    objective = DivergenceObjective(DivergenceParams(divergence=name, chunk_size=chunk_size, **own))
    signal = HiddenSignal() if fused else None
    return LMDistiller(student, teacher, objective=objective, signal=signal, tokenizers=TOKENIZERS, **kwargs)


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
    distiller = divergence_distiller(student, teacher, name, **DIVERGENCE_KWARGS.get(name, {}))
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
    plain = divergence_distiller(student, teacher, name, ce_weight=1.0, **kwargs)(data)
    grads_plain = torch.autograd.grad(plain["kd"] + plain["ce"], list(student.parameters()))
    fused = divergence_distiller(student, teacher, name, ce_weight=1.0, fused=True, chunk_size=5, **kwargs)(
        data
    )
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
    with pytest.raises(ValueError, match="rkll"):
        DivergenceParams(divergence="rkll")
    with pytest.raises(ValueError, match="provides 'hidden'"):
        LMDistiller(tiny_lm(), tiny_lm(1), objective=SampledTokenObjective(), signal=HiddenSignal())


def test_vocabularies_are_checked_wherever_teacher_and_student_meet() -> None:
    # defect: used from Python, LMDistiller silently cut two different vocabularies to the smaller one
    padded_teacher = tiny_lm(1, vocab=20)
    with pytest.raises(ValueError, match="tokenizers="):
        LMDistiller(tiny_lm(0), padded_teacher)  # sizes differ and nothing says it is only padding
    LMDistiller(tiny_lm(0), padded_teacher, tokenizers=TOKENIZERS)  # one tokenizer, padded: aligned
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(len(TOKENIZER))}
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    from kdkit.models.tokenizers import TokenizerMismatchError

    with pytest.raises(TokenizerMismatchError):
        LMDistiller(tiny_lm(0), tiny_lm(1), tokenizers=(TOKENIZER, other))


def build_method(name: str, student, teacher, **params):
    method = METHODS.get(name)
    return method.build(method.params(params), student, teacher, CTX, tokenizers=TOKENIZERS)


def test_methods_are_registered_and_build() -> None:
    expected = {
        "supervised_kd": "dataset",
        "seqkd": "teacher",
        "on_policy": "student",
        "sampled_token": "student",
    }
    lm_methods = [name for name, _, m in METHODS.items() if getattr(m, "kind", None) == "lm"]
    assert set(expected) | {"gkd", "minillm"} <= set(lm_methods)
    for name in lm_methods:
        assert issubclass(METHODS.get(name), LMMethod) and METHODS.describe(name)
    for name, source in expected.items():
        options = {} if source == "dataset" else {"max_new_tokens": 5}
        terms = build_method(name, tiny_lm(0), tiny_lm(1), **options)(batch())
        assert torch.isfinite(terms["kd"]), name
        assert terms["_on_policy"] == float(source == "student"), name
    gkd = build_method("gkd", tiny_lm(0), tiny_lm(1))
    assert isinstance(gkd.sampler, MixtureSampler) and gkd.sampler.lmbda == 0.5
    assert gkd.objective.params.divergence == "jsd" and gkd.objective.params.divergence_params == {
        "beta": 0.5
    }
    minillm = build_method("minillm", tiny_lm(0), tiny_lm(1), max_new_tokens=5, lmbda=0.0)  # teacher samples
    terms = minillm(batch())
    assert torch.isfinite(terms["kd"]) and "_log_ratio" in terms


def test_sampled_token_importance_weights_use_the_sampling_temperature() -> None:
    # defect: teacher samples drawn at τ were weighted by p_S/p_T at temperature 1
    torch.manual_seed(0)
    student, teacher = tiny_lm(0), tiny_lm(1)
    sampled = {**batch(), "source": "teacher", "sampling_temperature": 0.5}
    target = TokenLogprobsSignal()(sampled, teacher=teacher)
    assert target.behaviour_logprobs is not None
    logits, labels = teacher(input_ids=sampled["input_ids"]).logits, sampled["labels"]
    mask = labels[:, 1:] != -100
    expected = token_log_probs(logits[:, :-1], labels[:, 1:].clamp(min=0), temperature=0.5)
    assert torch.allclose(target.behaviour_logprobs[mask], expected[mask], atol=1e-5)
    assert not torch.allclose(target.behaviour_logprobs[mask], target.token_logprobs[mask], atol=1e-3)
    # the weights the objective applies are p_S / q_τ, so the loss differs from the τ = 1 weighting
    objective = SampledTokenObjective()
    from kdkit.objectives.lm import StudentView

    at_half = objective(StudentView(student, sampled), sampled, target)["kd"]
    target.behaviour_logprobs = None
    at_one = objective(StudentView(student, sampled), {**sampled, "sampling_temperature": 1.0}, target)["kd"]
    assert not torch.isclose(at_half, at_one)


def test_short_end_to_end_distillation_with_the_engine(tmp_path) -> None:
    from kdkit.engine import train

    teacher, student = tiny_lm(1, hidden=24), tiny_lm(0)
    distiller = divergence_distiller(
        student,
        teacher,
        "jsd",
        beta=0.5,
        ce_weight=0.1,
        sampler=MixtureSampler(
            0.5, on_policy=StudentSampler(**vars(gen_settings(8))), off_policy=DatasetSampler(), seed=0
        ),
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


def test_fused_distiller_applies_post_head_logit_transforms() -> None:
    # defect: the fused path projected hidden states with the raw head, ignoring Cohere's
    # logit_scale / Gemma 2's soft-cap, i.e. a different distribution than the model produces
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    common = dict(
        vocab_size=len(TOKENIZER),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        head_dim=8,
    )
    torch.manual_seed(0)
    student = CohereForCausalLM(CohereConfig(**common, logit_scale=0.4))
    teacher = Gemma2ForCausalLM(Gemma2Config(**common, final_logit_softcapping=3.0)).eval()
    data = batch()
    plain = divergence_distiller(student, teacher, "jsd", ce_weight=0.5)(data)
    fused = divergence_distiller(student, teacher, "jsd", ce_weight=0.5, fused=True, chunk_size=7)(data)
    assert torch.allclose(plain["kd"], fused["kd"], atol=1e-5)
    assert torch.allclose(plain["ce"], fused["ce"], atol=1e-5)
    grads_plain = torch.autograd.grad(
        plain["kd"] + plain["ce"], list(student.parameters()), allow_unused=True
    )
    grads_fused = torch.autograd.grad(
        fused["kd"] + fused["ce"], list(student.parameters()), allow_unused=True
    )
    for a, b in zip(grads_plain, grads_fused):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)
