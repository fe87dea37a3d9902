"""kdkit.distill with Hugging Face models (objects and folders) on text in a datasets.Dataset."""

from __future__ import annotations

import json

import pytest
import torch

import kdkit
from kdkit.data.examples import as_examples
from kdkit.methods.any_model import LogitsAdapter
from kdkit.models.builders import derive_student
from kdkit.pipelines.distill import predict
from tests.api.hf_tiny import save_tiny, sentences, tiny_bert, tiny_tokenizer


def agreement(student, teacher, examples) -> float:
    s = predict(LogitsAdapter(student), examples).argmax(1)
    t = predict(LogitsAdapter(teacher), examples).argmax(1)
    return float((s == t).float().mean())


@pytest.fixture
def text_data():
    from datasets import Dataset

    teacher = tiny_bert(layers=2, sharp=200.0)
    tokenizer = tiny_tokenizer()
    train = Dataset.from_dict({"text": sentences(600, seed=1)})  # label-free transfer text
    test_text = sentences(200, seed=2)
    labels = predict(LogitsAdapter(teacher), as_examples(Dataset.from_dict({"text": test_text}),
                                                         tokenizer=tokenizer)).argmax(1).tolist()
    test = Dataset.from_dict({"text": test_text, "label": labels})
    return teacher, tokenizer, train, test


def test_hf_model_objects_on_a_text_dataset(text_data, tmp_path):
    teacher, tokenizer, train, test = text_data
    student = tiny_bert(layers=1, seed=5)
    test_examples = as_examples(test, tokenizer=tokenizer)
    before = agreement(student, teacher, test_examples)
    result = kdkit.distill(teacher=teacher, student=student, data=train, eval_data=test, tokenizer=tokenizer,
                           method="kd", method_params={"temperature": 1.0}, steps=80, batch_size=32, lr=3e-3,
                           progress=False, output_dir=tmp_path, log=lambda _: None)
    after = agreement(result.student, teacher, test_examples)
    assert after > before + 0.15 and after > 0.75, (before, after)
    assert any("soft targets alone" in n for n in result.notes)
    saved = result.run_dir / "students" / "kd" / "model"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    assert (saved / "tokenizer.json").is_file()  # the folder is a complete HF model + tokenizer


def test_folders_by_name_with_the_teachers_tokenizer(text_data, tmp_path):
    teacher, _, train, test = text_data
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    student_dir = save_tiny(tmp_path / "student", layers=1, seed=5)
    result = kdkit.distill(teacher=str(tmp_path / "teacher"), student=str(student_dir),
                           task="sequence-classification", data=train, eval_data=test, method="kd",
                           steps=80, batch_size=32, lr=3e-3, progress=False, output_dir=tmp_path / "runs",
                           log=lambda _: None)
    assert result.metrics["agreement"] > 0.75
    record = json.loads((result.run_dir / "distill.json").read_text())
    assert record["teacher"]["source"] == str(tmp_path / "teacher")


def test_layer_selected_student_starts_from_the_teachers_blocks():
    teacher = tiny_bert(layers=4)
    student = derive_student(teacher, keep_layers=[0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    torch.testing.assert_close(student.bert.encoder.layer[1].output.dense.weight,
                               teacher.bert.encoder.layer[3].output.dense.weight)
    assert student.bert.encoder.layer[1].output.dense.weight.data_ptr() != \
        teacher.bert.encoder.layer[3].output.dense.weight.data_ptr()  # a copy, not shared
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched
    assert derive_student(teacher, keep_layers=2).config.num_hidden_layers == 2


def test_a_frozen_teachers_layer_selected_copy_still_trains():
    teacher = tiny_bert(layers=4).requires_grad_(False)
    student = derive_student(teacher, keep_layers=2)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
