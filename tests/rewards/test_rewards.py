"""Rewards: the judge's verdict from one forward pass, the task checkers, the teacher log-likelihood."""

from __future__ import annotations

import random

import pytest
import torch
from torch.testing import assert_close

from kdkit.registry import REWARDS
from kdkit.rewards import CheckerReward, JudgeReward, RewardInputs, TeacherLogLikelihoodReward
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.tasks.arithmetic import Problem, arithmetic_tokenizer, build_arithmetic_lm, make_problems
from kdkit.tasks.arithmetic_judge import (
    CORRUPTIONS,
    check_text,
    corrupt,
    judge_samples,
    judge_tokenizer,
)


def _tiny(tokenizer, seed: int = 0):
    return build_arithmetic_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    ).eval()


def test_judge_reward_equals_the_judges_next_token_probability_computed_directly() -> None:
    tokenizer = judge_tokenizer()
    judge = _tiny(tokenizer, seed=3)
    prompts = ["12+79=", "5+5=", "123+456="]
    completions = ["2+9+0=11|1+7+1=09|=91", "5+5+0=10|=10", "3+6"]  # different lengths: padding in play
    inputs = RewardInputs(prompts, completions)
    reward = JudgeReward(judge, tokenizer, template="{prompt}{completion}?", yes="Y", no="N", batch_size=2)
    got = reward(inputs)
    yes, no = tokenizer.convert_tokens_to_ids("Y"), tokenizer.convert_tokens_to_ids("N")
    expected, odds = [], []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = torch.tensor([tokenizer(f"{p}{c}?")["input_ids"]])
            probs = torch.softmax(judge(input_ids=ids).logits[0, -1].float(), -1)
            expected.append(float(probs[yes]))
            odds.append(float(probs[yes].log() - probs[no].log()))
    assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-5)
    reward.output = "log_odds"
    assert_close(reward(inputs), torch.tensor(odds), atol=1e-5, rtol=1e-5)
    reward.output = "normalised"
    assert_close(reward(inputs), torch.sigmoid(torch.tensor(odds)), atol=1e-6, rtol=1e-5)


def test_judge_reward_refuses_multi_token_verdicts_and_templates_without_fields() -> None:
    tokenizer = judge_tokenizer()
    judge = _tiny(tokenizer)
    with pytest.raises(ValueError, match="one token"):
        JudgeReward(judge, tokenizer, yes="YY")
    with pytest.raises(ValueError, match="completion"):
        JudgeReward(judge, tokenizer, template="{prompt}?")
    with pytest.raises(ValueError, match="tokenizer"):
        JudgeReward(judge)


def test_judge_named_in_a_config_loads_from_its_folder(tmp_path, kdkit_cache) -> None:
    tokenizer = judge_tokenizer()
    judge = _tiny(tokenizer, seed=4)
    judge.save_pretrained(tmp_path / "j")
    tokenizer.save_pretrained(tmp_path / "j")
    params = REWARDS.check_params("judge", {"judge": str(tmp_path / "j"), "output": "log_odds"})
    reward = REWARDS.get("judge")(**params)
    direct = JudgeReward(judge, tokenizer, output="log_odds")
    inputs = RewardInputs(["1+2="], ["1+2+0=03|=3"])
    assert_close(reward(inputs), direct(inputs))
    with pytest.raises(FileNotFoundError, match="get_arithmetic_judge"):
        JudgeReward("arithmetic")  # an empty cache: the built-in judge is not trained yet
    with pytest.raises(ValueError, match="not allowed"):
        REWARDS.check_params("judge", {"output": "logits"})


def test_arithmetic_checker_reward() -> None:
    reward = CheckerReward("arithmetic")
    problem = Problem(12, 79, 2)
    inputs = RewardInputs([problem.prompt] * 3, [problem.completion, "2+9+0=11|=90", "2+9"])
    assert reward(inputs).tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        check_text("hello", "=3")
    assert {"judge", "checker", "teacher_loglik"} <= set(REWARDS.names())
    assert CheckerReward(checker=lambda p, c: 0.5)(inputs).tolist() == [0.5] * 3


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_corruption_is_a_wrong_solution_in_the_task_format(kind: str) -> None:
    rng = random.Random(0)
    wrong = 0
    for problem in make_problems(100, (2, 5), seed=1):
        text = corrupt(problem, kind, rng)
        wrong += check_text(problem.prompt, text) == 0.0
        assert set(text) <= set("0123456789+=|")
    # a corruption may land on the right sum by chance; a "carry" drop after a column of exactly 9
    # with no carry-in changes nothing (labelled right by the checker)
    assert wrong >= (85 if kind == "carry" else 95)


def test_judge_samples_are_balanced_and_labelled_by_the_checker() -> None:
    samples = judge_samples(400, (1, 4), seed=2)
    labels = [s["label"] for s in samples]
    assert 0.4 < sum(labels) / len(labels) < 0.65
    for s in samples:
        assert s["completion"] == ("Y" if s["label"] else "N")
        prompt, completion = s["prompt"][:-1].split("=", 1)
        assert check_text(prompt + "=", completion) == s["label"]


def test_teacher_log_likelihood_reward_matches_a_direct_computation() -> None:
    tokenizer = arithmetic_tokenizer()
    teacher = _tiny(tokenizer, seed=5)
    problems = make_problems(3, (1, 3), seed=0)
    samples = [{"prompt": p.prompt, "completion": p.completion} for p in problems]
    batch = PromptCompletionCollator(tokenizer)(samples)
    inputs = RewardInputs([p.prompt for p in problems], [p.completion for p in problems], batch, teacher)
    reward = TeacherLogLikelihoodReward(mean=False)
    tokens = reward.token_rewards(inputs)
    with torch.no_grad():
        for i, p in enumerate(problems):
            prompt = tokenizer(p.prompt)["input_ids"]
            completion = tokenizer(p.completion, add_special_tokens=False)["input_ids"]
            full = prompt + completion + [tokenizer.eos_token_id]
            lp = torch.log_softmax(teacher(input_ids=torch.tensor([full])).logits[0, :-1], -1)
            direct = lp[torch.arange(len(full) - 1), torch.tensor(full[1:])][len(prompt) - 1 :].sum()
            assert_close(reward(inputs)[i], direct, atol=1e-5, rtol=1e-5)
            assert_close(tokens[i].sum(), direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        reward(RewardInputs(inputs.prompts, inputs.completions, batch, None))


def test_judge_is_trained_once_then_loaded_from_cache_with_its_accuracy(kdkit_cache, monkeypatch) -> None:
    import json

    from kdkit.pipelines import teachers
    from kdkit.pipelines.judges import get_arithmetic_judge
    from kdkit.tasks.arithmetic_judge import ArithmeticJudgeConfig

    config = ArithmeticJudgeConfig(
        digits=(1, 2), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, steps=2, batch_size=4
    )
    judge, tokenizer, folder = get_arithmetic_judge(config, progress=False)
    assert folder.parent == kdkit_cache / "judges"
    info = json.loads((folder / "kdkit_judge.json").read_text())
    assert {"all", "correct", "incorrect", "digits_1", "digits_3"} <= set(info["accuracy"])
    assert all(0.0 <= v <= 1.0 for v in info["accuracy"].values())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached judge was retrained")

    monkeypatch.setattr(teachers, "train_causal_lm", no_training)  # every cached LM trains there
    again, _, folder2 = get_arithmetic_judge(config)
    assert folder2 == folder
    for name, tensor in judge.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    reward = JudgeReward(again, tokenizer)
    assert reward(RewardInputs(["1+2="], ["1+2+0=03|=3"])).shape == (1,)


def test_generative_aux_trains_right_solutions_in_full_with_the_same_tokens() -> None:
    plain = judge_samples(50, (1, 3), seed=4)
    aux = judge_samples(50, (1, 3), seed=4, generative_aux=True)
    for a, b in zip(plain, aux):
        assert a["prompt"] + a["completion"] == b["prompt"] + b["completion"]
        assert (b["completion"] == "N") == (a["label"] == 0)
        if a["label"]:
            assert b["prompt"].endswith("=") and b["completion"].endswith("?Y")
