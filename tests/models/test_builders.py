"""Student builders: layer selection (HF encoders, decoders, plain modules), low-rank factorisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from kdkit.models.builders import (
    LOWRANK_FILE,
    LowRankEmbedding,
    LowRankLinear,
    derive_student,
    factorize,
    layer_stack,
    load_student,
    lowrank_layers,
    merge_lowrank,
    save_student,
    select_layers,
    select_module_layers,
)


def tiny_bert(layers: int = 4, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


IDS = torch.randint(1, 200, (3, 10), generator=torch.Generator().manual_seed(2))
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**BATCH).logits


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_rank_factorised_linear_reproduces_the_layer() -> None:
    dense = nn.Linear(24, 16)
    x = torch.randn(5, 7, 24)
    full = LowRankLinear.from_linear(dense, rank=16)
    torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.to_linear().weight, dense.weight, atol=1e-5, rtol=1e-5)
    # a truncated one does not, and its error is the dropped singular values' energy (Eckart-Young)
    low = LowRankLinear.from_linear(dense, rank=4)
    s = torch.linalg.svdvals(dense.weight.detach())
    err = (low.to_linear().weight - dense.weight).norm()
    torch.testing.assert_close(err, s[4:].norm(), atol=1e-4, rtol=1e-4)


def test_full_rank_factorised_embedding_reproduces_the_table() -> None:
    dense = nn.Embedding(50, 12, padding_idx=0)
    ids = torch.randint(0, 50, (4, 6))
    full = LowRankEmbedding.from_embedding(dense, rank=12)
    torch.testing.assert_close(full(ids), dense(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("allocation", ["uniform", "energy"])
@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_factorised_student_meets_the_parameter_budget(budget: float, allocation: str) -> None:
    teacher = tiny_bert()
    student, report = factorize(teacher, budget, allocation=allocation, example=BATCH)
    target = round(budget * params(teacher))
    assert report.student_parameters == params(student) <= target
    assert report.student_parameters >= 0.9 * target  # the budget is used, not wasted
    assert report.teacher_parameters == params(teacher)
    assert report.expected_speedup is not None and report.expected_speedup > 1.0
    assert lowrank_layers(student)  # something was factorised
    assert all(
        not isinstance(m, nn.Linear) or "classifier" in name or "second" in name or "first" in name
        for name, m in student.named_modules()
    )  # every linear layer except the 2-way head (too small to save anything) was factorised
    assert logits(student).shape == (3, 2)
    assert params(teacher) == report.teacher_parameters  # the teacher is untouched


def test_unreachable_budget_names_the_floor() -> None:
    with pytest.raises(ValueError, match="unreachable"):
        factorize(tiny_bert(), 0.01)
    with pytest.raises(ValueError, match="unreachable"):  # embeddings kept dense: half is too little
        factorize(tiny_bert(), 0.2, embeddings=False)


def test_factorised_student_round_trips_through_safetensors_and_json(tmp_path: Path) -> None:
    student, report = factorize(tiny_bert(), 0.5)
    folder = save_student(student, tmp_path / "lowrank")
    layout = json.loads((folder / LOWRANK_FILE).read_text())
    assert layout["format"] == "kdkit.lowrank" and layout["architecture"] == "BertForSequenceClassification"
    assert {name: spec["rank"] for name, spec in layout["layers"].items()} == report.ranks
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # no pickle
    again = load_student(folder)
    torch.testing.assert_close(logits(again), logits(student))
    # merged back to dense: the same function in the plain architecture, reloadable without kdkit
    merged = merge_lowrank(student)
    torch.testing.assert_close(logits(merged), logits(student), atol=1e-5, rtol=1e-4)
    merged.save_pretrained(tmp_path / "dense")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(logits(plain), logits(student), atol=1e-5, rtol=1e-4)


def test_from_scratch_factorised_student_has_the_same_shapes_but_new_weights() -> None:
    teacher = tiny_bert()
    init, _ = factorize(teacher, 0.5)
    scratch, _ = factorize(teacher, 0.5, copy_weights=False, seed=1)
    assert lowrank_layers(init) == lowrank_layers(scratch)
    assert not torch.allclose(logits(init), logits(scratch))


def test_layer_selected_encoder_reloads_with_plain_transformers(tmp_path: Path) -> None:
    teacher = tiny_bert(layers=4)
    assert layer_stack(teacher)[0] == "bert.encoder.layer"
    same = derive_student(teacher, keep_layers=[0, 1, 2, 3])
    torch.testing.assert_close(logits(same), logits(teacher))  # keeping every layer is the teacher
    student = derive_student(teacher, keep_layers=[1, 3], intermediate_size=40)
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 40
    torch.testing.assert_close(
        student.bert.encoder.layer[0].attention.self.query.weight,
        teacher.bert.encoder.layer[1].attention.self.query.weight,
    )
    torch.testing.assert_close(student.classifier.weight, teacher.classifier.weight)
    save_student(student, tmp_path / "s")
    assert not (tmp_path / "s" / LOWRANK_FILE).exists()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert type(plain) is BertForSequenceClassification
    torch.testing.assert_close(logits(plain), logits(student))
    scratch = derive_student(teacher, keep_layers=2, copy_weights=False, seed=0)
    assert params(scratch) == params(derive_student(teacher, keep_layers=2))


def test_select_layers_last_k() -> None:
    assert select_layers(6, "last:2") == [4, 5]
    with pytest.raises(ValueError, match="only 6"):
        select_layers(6, "last:7")


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(5)])
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_plain_module_layer_selection_and_factorisation(tmp_path: Path) -> None:
    model = Blocks()
    student = select_module_layers(model, [0, 4])
    assert len(student.blocks) == 2 and len(model.blocks) == 5
    torch.testing.assert_close(student.blocks[1][0].weight, model.blocks[4][0].weight)
    x = torch.randn(4, 8)
    assert student(x).shape == (4, 3)
    with pytest.raises(ValueError, match="ModuleList named 'layers'"):
        select_module_layers(model, 2, layers="layers")
    small, report = factorize(model, 0.6)
    assert report.student_parameters <= round(0.6 * params(model))
    folder = save_student(small, tmp_path / "plain")
    again = load_student(folder, skeleton=Blocks)
    torch.testing.assert_close(again(x), small(x))
