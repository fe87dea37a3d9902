"""GRPO / REINFORCE distillers on the engine's contract, their composition with KD, and scheduled GKD."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kdkit.engine.param_schedule import ParamSchedule
from kdkit.losses.tokens import shift, token_log_probs
from kdkit.methods.policy_gradient import PolicyGradientDistiller
from kdkit.methods.scheduled import ScheduledLMDistiller
from kdkit.objectives.lm import DivergenceObjective, DivergenceParams, token_divergence
from kdkit.registry import METHODS
from kdkit.rewards import CheckerReward, RewardInputs
from kdkit.samplers import DatasetSampler, GenerationSettings, MixtureSampler, StudentSampler
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.settings import LMContext
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm


def _model(tokenizer, seed):
    return build_arithmetic_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    )


@pytest.fixture(scope="module")
def setup():
    tokenizer = arithmetic_tokenizer()
    batch = PromptCompletionCollator(tokenizer)(arithmetic_dataset(3, (1, 2), seed=0))
    return tokenizer, batch


def _length_reward(inputs: RewardInputs) -> torch.Tensor:
    """A deterministic reward that differs within groups: the completion's length."""
    return torch.tensor([float(len(c)) for c in inputs.completions])


def _generation(tokenizer, max_new_tokens=8):
    return GenerationSettings(
        temperature=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def test_grpo_gradient_is_the_group_advantage_weighted_log_likelihood(setup) -> None:
    tokenizer, batch = setup
    torch.manual_seed(0)
    distiller = PolicyGradientDistiller(
        _model(tokenizer, 1),
        None,
        reward=_length_reward,
        tokenizer=tokenizer,
        group_size=4,
        generation=_generation(tokenizer),
    )
    out = distiller(batch)
    assert {"pg", "_reward", "_tokens", "_gen_s", "_tied_groups", "_clip_fraction"} <= set(out)
    assert "kd" not in out and "ce" not in out
    grads = torch.autograd.grad(out["pg"], list(distiller.student.parameters()))
    rollout = distiller._rollout
    sampled = rollout["batch"]
    assert sampled["input_ids"].shape[0] == 3 * 4
    # the prompts of a group are the same prompt
    prompts = sampled["prompt_ids"].view(3, 4, -1)
    assert bool((prompts == prompts[:, :1]).all())
    rewards = _length_reward(
        RewardInputs(
            [""] * 12,
            [
                tokenizer.decode(r[m].tolist(), skip_special_tokens=True)
                for r, m in zip(sampled["input_ids"], sampled["labels"] != -100)
            ],
        )
    )
    grouped = rewards.view(3, 4)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    adv = torch.where(grouped.std(1, keepdim=True).expand(3, 4).reshape(-1) > 0, adv, torch.zeros_like(adv))
    assert_close(rollout["advantages"], adv)
    logits = distiller.student(
        input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]
    ).logits
    shifted, targets, mask = shift(logits, sampled["labels"])
    logp = token_log_probs(shifted, targets)
    expected = -(adv[:, None] * logp * mask).sum() / mask.sum()
    expected_grads = torch.autograd.grad(expected, list(distiller.student.parameters()))
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert float(out["_tokens"]) == float(mask.sum())


def test_grpo_composes_with_on_policy_reverse_kl_each_term_weighted_and_logged(setup) -> None:
    tokenizer, batch = setup
    teacher = _model(tokenizer, 7)
    torch.manual_seed(1)
    distiller = PolicyGradientDistiller(
        _model(tokenizer, 1),
        teacher,
        reward=CheckerReward("arithmetic"),
        tokenizer=tokenizer,
        group_size=2,
        generation=_generation(tokenizer),
        pg_weight=0.5,
        kd_weight=2.0,
        divergence="rkl",
    )
    out = distiller(batch)
    sampled = distiller._rollout["batch"]
    with torch.no_grad():
        student_logits = distiller.student(
            input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]
        ).logits
        teacher_logits = teacher(
            input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]
        ).logits
    rkl = token_divergence(
        student_logits, teacher_logits, sampled["labels"], DivergenceParams(divergence="rkl")
    )
    assert_close(out["_kd_raw"], rkl)
    assert_close(out["kd"], 2.0 * rkl)
    assert_close(out["pg"], 0.5 * out["_pg_raw"])
    # an untrained student never gets the arithmetic right: all groups tie at reward 0, no PG signal
    assert float(out["_reward"]) == 0.0 and float(out["_tied_groups"]) == 1.0
    assert float(out["_pg_raw"].detach()) == 0.0


def test_sample_reuse_keeps_rollouts_and_moves_the_ratio(setup) -> None:
    tokenizer, batch = setup
    torch.manual_seed(2)
    distiller = PolicyGradientDistiller(
        _model(tokenizer, 3),
        None,
        reward=_length_reward,
        tokenizer=tokenizer,
        group_size=2,
        generation=_generation(tokenizer),
        num_iterations=2,
    )
    optimizer = torch.optim.SGD(distiller.parameters(), lr=5.0)
    first = distiller(batch)
    first["pg"].backward()
    optimizer.step()
    optimizer.zero_grad()
    rollout = distiller._rollout
    second = distiller(batch)
    assert distiller._rollout is rollout and float(second["_gen_s"]) == 0.0
    assert abs(float(second["_ratio"]) - 1.0) > 1e-4  # the policy moved since the samples were drawn
    distiller(batch)
    assert distiller._rollout is not rollout  # third call: fresh samples


def test_reinforce_uses_the_teachers_token_log_probs(setup) -> None:
    tokenizer, batch = setup
    teacher = _model(tokenizer, 9)
    torch.manual_seed(3)
    method = METHODS.get("reinforce")
    params = method.params({"max_new_tokens": 8})
    assert method.needs_teacher(params) and method.generates(params)
    distiller = method.build(params, _model(tokenizer, 1), teacher, LMContext.from_tokenizer(tokenizer))
    out = distiller(batch)
    sampled = distiller._rollout["batch"]
    with torch.no_grad():
        logits = teacher(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits
    shifted, targets, mask = shift(logits, sampled["labels"])
    expected = token_log_probs(shifted, targets) * mask
    assert_close(distiller._rollout["token_rewards"], expected)
    assert out["pg"].requires_grad and torch.isfinite(out["pg"])
    assert "grpo" in METHODS and "reinforce" in METHODS


def test_constructor_errors(setup) -> None:
    tokenizer, _ = setup
    student = _model(tokenizer, 1)
    with pytest.raises(ValueError, match="group_size"):
        PolicyGradientDistiller(student, None, reward=_length_reward, tokenizer=tokenizer, group_size=1)
    with pytest.raises(ValueError, match="needs a reward"):
        PolicyGradientDistiller(student, None, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="teacher"):
        PolicyGradientDistiller(student, None, estimator="reinforce", tokenizer=tokenizer, group_size=1)


def test_scheduled_gkd_moves_lambda_and_beta_with_the_optimizer_step(setup) -> None:
    tokenizer, batch = setup
    teacher = _model(tokenizer, 5)
    sampler = MixtureSampler(
        0.0, on_policy=StudentSampler(**vars(_generation(tokenizer, 4))), off_policy=DatasetSampler(), seed=0
    )
    distiller = ScheduledLMDistiller(
        _model(tokenizer, 1),
        teacher,
        sampler=sampler,
        objective=DivergenceObjective(DivergenceParams(divergence="jsd", beta=0.5)),
        lmbda=ParamSchedule(0.0, 1.0, steps=2),
        divergence_schedules={"beta": ParamSchedule(0.0, 1.0, steps=2)},
    )
    seen = []
    for step in range(3):
        distiller.on_step(step)  # what the engine announces before each optimizer step
        out = distiller(batch)
        seen.append((float(out["_lmbda"]), float(out["_beta"]), float(out["_on_policy"])))
    assert seen == [(0.0, 0.0, 0.0), (0.5, 0.5, seen[1][2]), (1.0, 1.0, 1.0)]
    assert distiller.objective.params.divergence_params["beta"] == 1.0
    with pytest.raises(ValueError, match="beta"):  # the schedule's end must be a valid β
        ScheduledLMDistiller(
            _model(tokenizer, 1),
            teacher,
            sampler=sampler,
            objective=DivergenceObjective(DivergenceParams(divergence="jsd")),
            divergence_schedules={"beta": ParamSchedule(0.0, 2.0, steps=2)},
        )


def test_policy_methods_from_flat_config_params(setup) -> None:
    tokenizer, batch = setup
    teacher = _model(tokenizer, 5)
    grpo = METHODS.get("grpo")
    params = grpo.params(
        {
            "reward": "checker",
            "task": "arithmetic",
            "group_size": 2,
            "kd_weight": 0.5,
            "divergence": "jsd",
            "beta": 0.2,
            "max_new_tokens": 6,
        }
    )
    assert params.reward_params == {"task": "arithmetic"} and params.divergence_params == {"beta": 0.2}
    assert grpo.needs_teacher(params)
    distiller = grpo.build(params, _model(tokenizer, 1), teacher, LMContext.from_tokenizer(tokenizer))
    out = distiller(batch)
    assert {"pg", "kd", "_reward", "_kd_raw"} <= set(out)
    assert not grpo.needs_teacher(grpo.params({"reward": "checker"}))
    with pytest.raises(ValueError, match="group_size"):
        grpo.params({"group_size": 1})
    with pytest.raises(ValueError, match="not a parameter"):
        grpo.params({"reward": "checker", "beta": 0.3})  # rkl has no beta
    with pytest.raises(ValueError, match="not allowed"):
        grpo.params({"reward": "checker", "task": "chess"})
    scheduled = METHODS.get("gkd_scheduled")
    sp = scheduled.params({"lmbda": 0.0, "lmbda_end": 1.0, "beta_end": 1.0, "schedule_steps": 4})
    built = scheduled.build(sp, _model(tokenizer, 1), teacher, LMContext.from_tokenizer(tokenizer))
    assert isinstance(built, ScheduledLMDistiller) and built.lmbda_schedule(4) == 1.0
