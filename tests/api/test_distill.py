"""kdkit.distill on each accepted form of models and data: the student moves toward the teacher."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

import kdkit
from tests.api.conftest import FAST, agreement, make_student


def quiet(_: str) -> None:
    pass


def test_tensors_pair_improves_agreement_and_writes_the_report(teacher, tensors, tmp_path):
    x, y, x_test, y_test = tensors
    student = make_student()
    before = agreement(student, teacher, x_test)
    result = kdkit.distill(teacher=teacher, student=student, data=(x, y), eval_data=(x_test, y_test),
                           method="kd", method_params={"temperature": 2.0}, output_dir=tmp_path, log=quiet,
                           **FAST)
    after = agreement(result.student, teacher, x_test)
    assert result.student is student  # trained in place
    assert after > before + 0.2 and after > 0.7
    assert result.metrics["agreement"] == pytest.approx(after)
    assert result.metrics["teacher_accuracy"] == 1.0
    for name in ("metrics.json", "report.md", "report.html", "distill.json"):
        assert (result.run_dir / name).is_file()
    rows = json.loads((result.run_dir / "metrics.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "kd"]
    assert (result.run_dir / "students" / "kd" / "model.safetensors").is_file()
    history = (result.run_dir / "students" / "kd" / "metrics.jsonl").read_text().splitlines()
    assert {"kd", "ce"} <= set(json.loads(history[-1]))  # labelled data: soft targets and labels


def test_label_free_inputs_train_on_soft_targets_alone(teacher, tensors, tmp_path):
    x, _, x_test, y_test = tensors
    student = make_student()
    before = agreement(student, teacher, x_test)
    messages: list[str] = []
    result = kdkit.distill(teacher=teacher, student=student, data=x, eval_data=(x_test, y_test), method="kd",
                           output_dir=tmp_path, log=messages.append, **FAST)
    assert agreement(result.student, teacher, x_test) > before + 0.2
    assert any("soft targets alone" in m for m in messages)
    assert any("soft targets alone" in n for n in result.notes)
    assert "soft targets alone" in (result.run_dir / "report.md").read_text()
    last = json.loads((result.run_dir / "students" / "kd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "kd" in last and "ce" not in last


def test_partly_labelled_data_mixes_soft_targets_and_labels(teacher, tensors, tmp_path):
    x, y, x_test, y_test = tensors
    y = y.clone()
    y[100:] = -100  # only the first 100 examples are labelled
    messages: list[str] = []
    result = kdkit.distill(teacher=teacher, student=make_student(), data=(x, y), eval_data=(x_test, y_test),
                           method="kd", output_dir=tmp_path, log=messages.append, **FAST)
    assert any("100 of 900" in m for m in messages)
    assert result.metrics["agreement"] > 0.7
    assert all(torch.isfinite(torch.tensor(v)) for v in result.rows[1].values() if isinstance(v, float))


class PairDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class DictDataset(PairDataset):
    def __getitem__(self, i):
        return {"inputs": self.x[i], "label": self.y[i]}


@pytest.mark.parametrize("kind", [PairDataset, DictDataset])
def test_torch_datasets_of_pairs_and_dicts(kind, teacher, tensors, tmp_path):
    x, y, x_test, y_test = tensors
    student = make_student()
    before = agreement(student, teacher, x_test)
    result = kdkit.distill(teacher=teacher, student=student, data=kind(x, y), eval_data=kind(x_test, y_test),
                           method="dist", output_dir=tmp_path, log=quiet, **FAST)
    assert agreement(result.student, teacher, x_test) > before + 0.2


def test_datasets_dataset_with_named_columns(teacher, tensors, tmp_path):
    from datasets import Dataset as HFDataset

    x, y, x_test, y_test = tensors
    train = HFDataset.from_dict({"features": x.tolist(), "target": y.tolist()})
    test = HFDataset.from_dict({"features": x_test.tolist(), "target": y_test.tolist()})
    student = make_student()
    before = agreement(student, teacher, x_test)
    result = kdkit.distill(teacher=teacher, student=student, data=train, eval_data=test, method="kd",
                           input_column="features", label_column="target", output_dir=tmp_path, log=quiet,
                           **FAST)
    assert agreement(result.student, teacher, x_test) > before + 0.2


def test_scratch_needs_no_teacher(tensors, tmp_path):
    x, y, x_test, y_test = tensors
    result = kdkit.distill(student=make_student(), data=(x, y), eval_data=(x_test, y_test), method="scratch",
                           output_dir=tmp_path, log=quiet, **FAST)
    assert result.metrics["accuracy"] > 0.7
    assert "teacher_accuracy" not in result.metrics


def test_teacher_logits_are_cached_once_and_match_a_live_teacher(teacher, tensors, tmp_path):
    x, y, x_test, y_test = tensors
    calls = {"n": 0}
    hook = teacher.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        cached = kdkit.distill(teacher=teacher, student=make_student(), data=(x, y), method="kd",
                               output_dir=tmp_path / "a", log=quiet, **FAST)
        calls_cached = calls["n"]
        calls["n"] = 0
        live = kdkit.distill(teacher=teacher, student=make_student(), data=(x, y), method="kd",
                             cache_teacher=False, output_dir=tmp_path / "b", log=quiet, **FAST)
    finally:
        hook.remove()
    assert calls_cached <= 2 + (900 + 255) // 256  # 2 probes + one pass over the data
    assert calls["n"] >= FAST["steps"]  # a live teacher runs on every batch
    assert cached.teacher_cache_s is not None and live.teacher_cache_s is None
    for a, b in zip(cached.student.parameters(), live.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_evaluate_compares_models_trained_elsewhere(teacher, tensors, tmp_path):
    _, _, x_test, y_test = tensors
    result = kdkit.evaluate({"teacher": teacher, "untrained": make_student()}, (x_test, y_test),
                            output_dir=tmp_path, log=quiet, latency_repeats=2)
    assert result.row("teacher")["accuracy"] == 1.0
    assert result.row("untrained")["agreement"] == pytest.approx(result.row("untrained")["accuracy"])
    assert result.row("untrained")["parameters"] == 12 * 16 + 16 + 16 * 4 + 4
    assert (result.run_dir / "report.html").is_file()


def test_import_kdkit_stays_light():
    import subprocess
    import sys

    code = "import sys, kdkit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_the_callers_teacher_comes_back_as_it_was(teacher, tensors, tmp_path):
    x, y, _, _ = tensors
    teacher.train()
    kdkit.distill(teacher=teacher, student=make_student(), data=(x, y), method="kd", output_dir=tmp_path,
                  log=quiet, **{**FAST, "steps": 2})
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
