"""Samplers: batch layout, generated completions and their masks, the λ-mixture."""

from __future__ import annotations

import pytest
import torch

from kdkit.samplers import (
    IGNORE_INDEX,
    DatasetSampler,
    GenerationSettings,
    MixtureSampler,
    PromptCompletionCollator,
    StudentSampler,
    TeacherSampler,
    completion_lengths,
    generate_batch,
)
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm


@pytest.fixture(scope="module")
def tokenizer():
    return arithmetic_tokenizer()


def tiny_lm(tokenizer, seed: int = 0, layers: int = 1):
    return build_arithmetic_lm(
        tokenizer, hidden_size=16, num_layers=layers, num_heads=2, intermediate_size=32, seed=seed
    )


def dataset_batch(tokenizer, n: int = 6, seed: int = 0):
    return PromptCompletionCollator(tokenizer)(arithmetic_dataset(n, (1, 3), seed=seed))


def test_collator_masks_prompt_and_padding(tokenizer) -> None:
    samples = arithmetic_dataset(4, (1, 3), seed=2)
    batch = PromptCompletionCollator(tokenizer)(samples)
    for i, sample in enumerate(samples):
        prompt = tokenizer(sample["prompt"])["input_ids"]
        completion = tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
        completion.append(tokenizer.eos_token_id)
        n = len(prompt) + len(completion)
        assert batch["input_ids"][i, :n].tolist() == prompt + completion
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        labels = batch["labels"][i].tolist()
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) : n] == completion
        assert set(labels[n:]) <= {IGNORE_INDEX}
        # the prompt alone, left-padded
        width = batch["prompt_ids"].shape[1]
        assert batch["prompt_ids"][i, width - len(prompt) :].tolist() == prompt
        assert batch["prompt_attention_mask"][i].sum() == len(prompt)
        assert batch["prompt_attention_mask"][i, -1] == 1
    assert batch["digits"].tolist() == [s["digits"] for s in samples]


def test_completion_lengths_stop_at_first_eos() -> None:
    new = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert completion_lengths(new, eos_token_id=2).tolist() == [2, 4, 1]
    assert completion_lengths(new, eos_token_id=None).tolist() == [4, 4, 4]


def _check_generated_layout(batch, prompt_batch, tokenizer, max_new: int) -> None:
    """Labels are exactly the generated tokens up to and including the first EOS."""
    eos = tokenizer.eos_token_id
    for i in range(batch["input_ids"].shape[0]):
        prompt = prompt_batch["prompt_ids"][i][prompt_batch["prompt_attention_mask"][i].bool()].tolist()
        labels = batch["labels"][i]
        trained = labels[labels != IGNORE_INDEX].tolist()
        length = int(batch["attention_mask"][i].sum())
        assert length == len(prompt) + len(trained)
        assert batch["input_ids"][i, : len(prompt)].tolist() == prompt
        assert batch["input_ids"][i, len(prompt) : length].tolist() == trained
        assert (labels[: len(prompt)] == IGNORE_INDEX).all() and (labels[length:] == IGNORE_INDEX).all()
        assert eos not in trained[:-1]
        assert trained[-1] == eos or len(trained) == max_new
        text = tokenizer.decode(batch["input_ids"][i, :length])
        assert text.startswith(tokenizer.decode(prompt))


def test_student_sampler_labels_line_up_with_generated_tokens(tokenizer) -> None:
    student = tiny_lm(tokenizer).train()
    data = dataset_batch(tokenizer, n=8)
    sampler = StudentSampler(temperature=1.5, max_new_tokens=20)
    torch.manual_seed(1)
    out = sampler(data, student=student, teacher=None)
    assert out["source"] == "student" and student.training
    _check_generated_layout(out, data, tokenizer, max_new=20)
    info = out["sampler_info"]
    last = [row[row != IGNORE_INDEX][-1] for row in out["labels"]]
    ended = sum(int(token == tokenizer.eos_token_id) for token in last)
    assert info["truncated"] == 8 - ended and 0 < ended < 8  # both kinds of rows are covered
    assert info["new_tokens"] == float((out["labels"] != IGNORE_INDEX).sum()) and info["generation_s"] > 0
    assert torch.equal(out["digits"], data["digits"])  # dataset fields kept


def test_greedy_sampler_matches_hf_generate_text(tokenizer) -> None:
    teacher = tiny_lm(tokenizer, seed=3)
    data = dataset_batch(tokenizer, n=4, seed=1)
    out = TeacherSampler(temperature=0.0, max_new_tokens=10)(
        data, student=tiny_lm(tokenizer), teacher=teacher
    )
    assert out["source"] == "teacher"
    reference = teacher.generate(
        input_ids=data["prompt_ids"],
        attention_mask=data["prompt_attention_mask"],
        do_sample=False,
        max_new_tokens=10,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[:, data["prompt_ids"].shape[1] :]
    for i in range(4):
        labels = out["labels"][i]
        sampled = tokenizer.decode(labels[labels != IGNORE_INDEX])
        expected = tokenizer.decode(reference[i]).split("<eos>")[0]
        assert sampled.removesuffix("<eos>") == expected
    _check_generated_layout(out, data, tokenizer, max_new=10)


def test_teacher_sampler_needs_a_teacher(tokenizer) -> None:
    with pytest.raises(ValueError, match="teacher"):
        TeacherSampler()(dataset_batch(tokenizer), student=tiny_lm(tokenizer), teacher=None)


def test_dataset_sampler_passes_the_batch_through(tokenizer) -> None:
    data = dataset_batch(tokenizer)
    out = DatasetSampler()(data, student=tiny_lm(tokenizer), teacher=None)
    assert out["source"] == "dataset" and torch.equal(out["labels"], data["labels"])


@pytest.mark.parametrize(("lmbda", "expected"), [(0.0, {"dataset"}), (1.0, {"student"})])
def test_mixture_edges_are_pure(tokenizer, lmbda: float, expected: set[str]) -> None:
    student = tiny_lm(tokenizer)
    data = dataset_batch(tokenizer, n=2)
    sampler = MixtureSampler(
        lmbda, on_policy=StudentSampler(max_new_tokens=4), off_policy=DatasetSampler(), seed=0
    )
    assert {sampler(data, student=student, teacher=None)["source"] for _ in range(6)} == expected


def test_mixture_is_seeded_and_resumable() -> None:
    class Tag:
        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, batch, *, student, teacher):
            return {"source": self.name}

    def draws(sampler, n):
        return [sampler({}, student=None, teacher=None)["source"] for _ in range(n)]

    a = MixtureSampler(0.5, on_policy=Tag("student"), off_policy=Tag("dataset"), seed=7)
    b = MixtureSampler(0.5, on_policy=Tag("student"), off_policy=Tag("dataset"), seed=7)
    first = draws(a, 200)
    assert first == draws(b, 200)
    assert 70 < first.count("student") < 130
    state = a.state_dict()
    after = draws(a, 20)
    a.load_state_dict(state)
    assert draws(a, 20) == after
    with pytest.raises(ValueError):
        MixtureSampler(1.5)


def test_generate_batch_without_eos_keeps_all_tokens(tokenizer) -> None:
    model = tiny_lm(tokenizer)
    data = dataset_batch(tokenizer, n=3)
    # an EOS id outside the vocabulary: no row can stop, every row is truncated at max_new_tokens
    settings = GenerationSettings(temperature=0.0, max_new_tokens=5, eos_token_id=99, pad_token_id=0)
    out, info = generate_batch(model, data["prompt_ids"], data["prompt_attention_mask"], settings)
    assert ((out["labels"] != IGNORE_INDEX).sum(1) == 5).all() and info["truncated"] == 3
