"""Gradient accumulation weighs tokens alike: a distiller reporting `_tokens` gets its micro-batch
losses weighted by their token counts and normalised by the tokens of the whole optimizer step, so
batch 32 = batch 8 × accumulation 4 even when completion lengths differ by tenfold. Distillers
without `_tokens` keep per-example weighting."""

import json

import pytest
import torch
from torch.func import functional_call

from kdkit.engine import Distiller, train
from kdkit.engine.data import EpochSampler
from tests.engine.tiny_lm import CompletionDataset, TokenKD, lm_config, make_models, token_terms


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(distiller):
    return {k: v.detach().clone() for k, v in distiller.student.state_dict().items()}


def first_step_batch(cfg, dataset):
    """The cfg.batch_size × grad_accum_steps samples of the first optimizer step, stacked."""
    order = list(EpochSampler(len(dataset), cfg.seed))[: cfg.batch_size * cfg.grad_accum_steps]
    return {key: torch.stack([dataset[i][key] for i in order]) for key in dataset[0]}


def manual_sgd_step(loss_of, lr):
    """Student weights after one plain SGD step on loss_of(params) from the initial weights."""
    student, teacher = make_models()
    params = {k: v.detach().requires_grad_() for k, v in student.named_parameters()}
    grads = torch.autograd.grad(loss_of(student, teacher, params), list(params.values()))
    return {k: (p - lr * g).detach() for (k, p), g in zip(params.items(), grads)}


def test_batch_32_equals_batch_8_times_accumulation_4_on_uneven_completions(tmp_path):
    runs = {}
    for name, batch, accum in [("big", 32, 1), ("accum", 8, 4)]:
        distiller = TokenKD(*make_models())
        train(distiller, CompletionDataset(), lm_config(steps=4, batch_size=batch, grad_accum_steps=accum),
              tmp_path / name)
        runs[name] = (weights(distiller), history(tmp_path / name))
    (big, big_log), (accum, accum_log) = runs["big"], runs["accum"]
    for key in big:
        torch.testing.assert_close(accum[key], big[key], rtol=0, atol=1e-6)
    # the logged terms are token-weighted means too, so both runs log the same values
    for a, b in zip(big_log, accum_log, strict=True):
        for key in ("loss", "kd", "ce"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
        assert b["diag/tokens"] == pytest.approx(a["diag/tokens"] / 4)  # diagnostics: per micro-batch


def test_the_step_is_sgd_on_the_mean_over_every_token_of_the_step(tmp_path):
    dataset = CompletionDataset()
    cfg = lm_config(steps=1, batch_size=8, grad_accum_steps=4)
    distiller = TokenKD(*make_models())
    train(distiller, dataset, cfg, tmp_path)
    batch = first_step_batch(cfg, dataset)

    def token_mean(student, teacher, params):
        terms = token_terms(lambda ids: functional_call(student, params, (ids,)), teacher, batch)
        return terms["kd"] + terms["ce"]

    expected = manual_sgd_step(token_mean, cfg.lr)
    for key, value in expected.items():
        torch.testing.assert_close(weights(distiller)[key], value, rtol=0, atol=1e-6)
    record = history(tmp_path)[0]
    with torch.no_grad():
        terms = token_terms(make_models()[0], make_models()[1], batch)
    assert record["loss"] == pytest.approx(float(terms["kd"] + terms["ce"]), abs=1e-6)


def test_without_a_token_count_micro_batches_weigh_alike(tmp_path):
    dataset = CompletionDataset()
    cfg = lm_config(steps=1, batch_size=8, grad_accum_steps=4)
    distiller = TokenKD(*make_models(), report_tokens=False)
    train(distiller, dataset, cfg, tmp_path)
    batch = first_step_batch(cfg, dataset)

    def mean_of_micro_batch_means(student, teacher, params):
        total = 0.0
        for start in range(0, 32, 8):
            micro = {k: v[start : start + 8] for k, v in batch.items()}
            terms = token_terms(lambda ids: functional_call(student, params, (ids,)), teacher, micro)
            total = total + (terms["kd"] + terms["ce"]) / 4
        return total

    expected = manual_sgd_step(mean_of_micro_batch_means, cfg.lr)
    for key, value in expected.items():
        torch.testing.assert_close(weights(distiller)[key], value, rtol=0, atol=1e-6)


def test_resume_in_token_mode_matches_an_uninterrupted_run(tmp_path):
    cfg = lm_config(steps=6, batch_size=8, grad_accum_steps=2, checkpoint_every=2)
    reference = TokenKD(*make_models())
    train(reference, CompletionDataset(), cfg, tmp_path / "reference")
    crashed = TokenKD(*make_models(), fail_after=7)  # dies in step 4, after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(crashed, CompletionDataset(), cfg, tmp_path / "run")
    resumed = TokenKD(*make_models())
    result = train(resumed, CompletionDataset(), cfg, tmp_path / "run", resume=True)
    assert result.resumed_from == 2
    for key, value in weights(reference).items():
        assert torch.equal(weights(resumed)[key], value), key
    strip = lambda records: [{k: v for k, v in r.items() if k != "elapsed_s" and k != "examples_per_s"}  # noqa: E731
                             for r in records]
    assert strip(history(tmp_path / "run")) == strip(history(tmp_path / "reference"))


class _SometimesCounts(Distiller):
    def __init__(self) -> None:
        super().__init__(make_models()[0], make_models()[1])
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        terms = token_terms(self.student, self.teacher, batch)
        if self.calls % 2 == 0:
            del terms["_tokens"]
        return terms


def test_a_token_count_in_only_some_micro_batches_is_a_clear_error(tmp_path):
    cfg = lm_config(steps=1, batch_size=8, grad_accum_steps=2)
    with pytest.raises(ValueError, match="_tokens"):
        train(_SometimesCounts(), CompletionDataset(), cfg, tmp_path)
