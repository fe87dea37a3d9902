"""Logits only where a label is predicted: the live teacher signal and the student's view skip the
positions before the first trained one (the prompts), and every loss is unchanged by it."""

from __future__ import annotations

import pytest
import torch

from kdkit.losses.tokens import first_trained_position
from kdkit.methods import LMDistiller
from kdkit.objectives.lm import (
    DivergenceObjective,
    DivergenceParams,
    SampledTokenObjective,
    StudentView,
    completion_cross_entropy,
    token_divergence,
)
from kdkit.samplers import PromptCompletionCollator
from kdkit.signals import LogitsSignal, TeacherTarget
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

TOKENIZER = arithmetic_tokenizer()


def tiny_lm(seed: int, hidden: int = 16):
    return build_arithmetic_lm(
        TOKENIZER, hidden_size=hidden, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    )


def batch():
    # 1- and 3-digit operands: prompts of different lengths, so rows start training at different places
    samples = arithmetic_dataset(3, (1, 1), seed=0) + arithmetic_dataset(3, (3, 3), seed=1)
    return PromptCompletionCollator(TOKENIZER)(samples)


def inputs(data):
    return {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}


def test_first_trained_position() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, 8]])
    assert first_trained_position(labels) == 1  # position 1 predicts row 0's first label
    assert first_trained_position(torch.tensor([[-100, 4, 5]])) == 0
    assert first_trained_position(torch.full((2, 4), -100)) == 0  # nothing trained: nothing to skip


def test_the_teacher_signal_projects_only_the_positions_that_predict_labels() -> None:
    teacher, data = tiny_lm(1).eval(), batch()
    rows = []
    teacher.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    target = LogitsSignal()(data, teacher=teacher)
    start = first_trained_position(data["labels"])
    length = data["input_ids"].shape[1]
    assert start > 0 and target.start == start
    assert rows == [length - start]  # the head saw only the window
    full = teacher(**inputs(data)).logits
    assert torch.allclose(target.logits, full[:, start:], atol=1e-6)
    assert torch.allclose(target.logits_from(start + 2), full[:, start + 2 :], atol=1e-6)
    with pytest.raises(ValueError, match="start at position"):
        target.logits_from(start - 1)


@pytest.mark.parametrize(("name", "kwargs"), [("fkl", {}), ("jsd", {"beta": 0.3}), ("rkl", {})])
def test_loss_and_gradients_equal_those_from_the_full_logits(name: str, kwargs: dict) -> None:
    student, teacher, data = tiny_lm(0), tiny_lm(1, hidden=24).eval(), batch()
    params = DivergenceParams(divergence=name, temperature=2.0, **kwargs)
    distiller = LMDistiller(
        student, teacher, objective=DivergenceObjective(params), kd_weight=1.0, ce_weight=0.5
    )
    terms = distiller(data)
    (terms["kd"] + terms["ce"]).backward()
    windowed = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    full = student(**inputs(data)).logits
    with torch.no_grad():
        teacher_full = teacher(**inputs(data)).logits
    kd = token_divergence(full, teacher_full, data["labels"], params)
    ce = completion_cross_entropy(full, data["labels"])
    assert torch.allclose(terms["kd"], kd, atol=1e-6) and torch.allclose(terms["ce"], 0.5 * ce, atol=1e-6)
    (kd + 0.5 * ce).backward()
    for n, p in student.named_parameters():
        assert torch.allclose(windowed[n], p.grad, atol=1e-6), n


def test_the_student_runs_once_and_projects_only_the_window() -> None:
    student, teacher, data = tiny_lm(0), tiny_lm(1).eval(), batch()
    rows = []
    student.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    LMDistiller(student, teacher, kd_weight=1.0, ce_weight=1.0)(data)  # kd and ce from one forward pass
    assert rows == [data["input_ids"].shape[1] - first_trained_position(data["labels"])]


def test_sampled_token_objective_reads_a_windowed_teacher_like_a_full_one() -> None:
    student, teacher, data = tiny_lm(0), tiny_lm(1).eval(), batch()
    with torch.no_grad():
        full = teacher(**inputs(data)).logits
    start = first_trained_position(data["labels"])
    objective = SampledTokenObjective()
    whole = objective(StudentView(student, data), data, TeacherTarget(logits=full))
    window = objective(StudentView(student, data), data, TeacherTarget(logits=full[:, start:], start=start))
    for key in whole:
        assert torch.allclose(whole[key], window[key], atol=1e-6), key


def test_a_sparse_target_is_cut_to_the_window_like_the_logits() -> None:
    from kdkit.losses.sparse import topk_target
    from kdkit.objectives.lm.sparse import sparse_token_divergence
    from kdkit.signals import SparseTarget

    student, teacher, data = tiny_lm(0), tiny_lm(1).eval(), batch()
    with torch.no_grad():
        stored = topk_target(teacher(**inputs(data)).logits[:, :-1], 4)  # over shifted positions
    sparse = SparseTarget(ids=stored["ids"], logprobs=stored["logprobs"], tail_logprob=stored["tail_logprob"])
    params = DivergenceParams(divergence="jsd", beta=0.5)
    windowed = DivergenceObjective(params)(StudentView(student, data), data, TeacherTarget(sparse=sparse))[
        "kd"
    ]
    windowed.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    full = sparse_token_divergence(student(**inputs(data)).logits, data["labels"], sparse, params)
    full.backward()
    assert torch.allclose(windowed, full, atol=1e-6)
    for n, p in student.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6), n
