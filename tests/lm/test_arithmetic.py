"""The arithmetic task: text format, checker, tokenizer, exact match by length, the teacher cache."""

from __future__ import annotations

import re

import pytest
import torch

from kdkit.tasks.arithmetic import (
    EOS,
    Problem,
    arithmetic_dataset,
    arithmetic_tokenizer,
    build_arithmetic_lm,
    check_answer,
    exact_match_by_length,
    make_problems,
    parse_answer,
)


def test_completion_works_out_the_sum_column_by_column() -> None:
    problem = Problem(a=12, b=79, digits=2)
    assert problem.prompt == "12+79="
    assert problem.completion == "2+9+0=11|1+7+1=09|=91"
    assert Problem(a=95, b=17, digits=2).completion == "5+7+0=12|9+1+1=11|=112"  # final carry


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_step_is_arithmetically_right(seed: int) -> None:
    for problem in make_problems(200, (1, 6), seed=seed):
        *steps, answer = problem.completion.split("|")
        carry = 0
        for step in steps:
            match = re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d\d)", step)
            assert match, step
            x, y, c, total = (int(g) for g in match.groups())
            assert c == carry and x + y + c == total
            carry = total // 10
        assert len(steps) == problem.digits
        assert answer == f"={problem.a + problem.b}"


def test_make_problems_respects_lengths_and_seed() -> None:
    problems = make_problems(300, (2, 4), seed=5)
    assert {p.digits for p in problems} == {2, 3, 4}
    assert all(len(str(p.a)) == p.digits and len(str(p.b)) == p.digits for p in problems)
    assert problems == make_problems(300, (2, 4), seed=5)
    assert problems != make_problems(300, (2, 4), seed=6)
    with pytest.raises(ValueError):
        make_problems(1, (3, 2))


def test_checker_accepts_the_right_answer_only() -> None:
    problem = Problem(a=12, b=79, digits=2)
    assert check_answer(problem, problem.completion)
    assert check_answer(problem, problem.completion + EOS)
    assert not check_answer(problem, "2+9+0=11|1+7+1=09|=92")
    assert not check_answer(problem, "2+9+0=11|1+7+1")  # cut off before the answer
    assert parse_answer("garbage") is None and parse_answer("=1a") is None


def test_tokenizer_round_trips_and_adds_bos() -> None:
    tokenizer = arithmetic_tokenizer()
    problem = Problem(a=4071, b=938, digits=4)
    text = problem.prompt + problem.completion
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    plain = tokenizer(problem.completion, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(plain + [tokenizer.eos_token_id]) == problem.completion + EOS
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert len(tokenizer) == 16


def test_dataset_samples() -> None:
    samples = arithmetic_dataset(5, (3, 3), seed=1)
    assert [s["digits"] for s in samples] == [3] * 5
    assert all(s["prompt"].endswith("=") and s["completion"].startswith(s["prompt"][2]) for s in samples)


def _tiny(tokenizer):
    return build_arithmetic_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def test_exact_match_by_length_counts_per_length() -> None:
    tokenizer = arithmetic_tokenizer()
    model = _tiny(tokenizer).train()
    problems = make_problems(20, (1, 3), seed=0)
    accuracy = exact_match_by_length(model, tokenizer, problems, batch_size=8)
    assert set(accuracy) == {p.digits for p in problems}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert model.training  # restored


def test_exact_match_is_one_for_a_model_that_writes_the_answers(monkeypatch) -> None:
    """Greedy generate replaced by an oracle: the decoding/scoring path must then give 1.0."""
    tokenizer = arithmetic_tokenizer()
    model = _tiny(tokenizer)
    problems = make_problems(6, (1, 2), seed=3)
    answers = {p.prompt: p.completion for p in problems}

    def oracle(input_ids, attention_mask, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            rows.append(tokenizer(answers[prompt] + EOS, add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        new = torch.full((len(rows), width), tokenizer.pad_token_id)
        for i, row in enumerate(rows):
            new[i, : len(row)] = torch.tensor(row)
        return torch.cat([input_ids, new], 1)

    monkeypatch.setattr(model, "generate", oracle)
    assert exact_match_by_length(model, tokenizer, problems, batch_size=4) == {1: 1.0, 2: 1.0}
