"""A tiny end-to-end classifier run on fake Fashion-MNIST files: teacher cached, students, report."""

import json

import pytest
import torch

from kdkit.config.classifier import ClassifierRunConfig
from kdkit.pipelines.classifier import (
    evaluate_classifier_run,
    load_data,
    load_or_train_teacher,
    run_classifier,
    teacher_cache_dir,
)
from tests.test_fashion_mnist_data import _fake_dataset


@pytest.fixture
def tiny_config(tmp_path, kdkit_cache) -> ClassifierRunConfig:
    _fake_dataset(tmp_path / "data", n_train=96, n_test=40)
    fast = {"batch_size": 16, "lr": 0.01, "progress": False, "log_every": 2, "checkpoint_every": 4}
    return ClassifierRunConfig.model_validate(
        {
            "kind": "classifier",
            "name": "tiny",
            "data": {"root": str(tmp_path / "data")},
            "teacher": {"arch": "cnn", "params": {"width": 4, "stages": 2}, "train": {"steps": 6, **fast}},
            "student": {"arch": "cnn", "params": {"width": 2, "stages": 2}},
            "students": [
                {"name": "scratch", "method": "scratch"},
                {"name": "kd", "method": "kd"},
                {"name": "dkd", "method": "dkd"},
                {"name": "fitnet", "method": "fitnet"},
                {"name": "mlp-dist", "method": "dist", "model": {"arch": "mlp", "params": {"hidden": [8]}}},
            ],
            "train": {"steps": 4, **fast},
            "eval": {"batch_size": 16, "latency_repeats": 2},
            "output_dir": str(tmp_path / "runs"),
            "threads": 1,
        }
    )


def test_tiny_run_writes_report_and_reuses_cached_teacher(tiny_config, tmp_path):
    lines: list[str] = []
    run_dir = run_classifier(tiny_config, log=lines.append)
    assert run_dir.parent == tmp_path / "runs" / "tiny"
    for name in ("metrics.json", "report.md", "report.html", "config.json", "teacher/model.safetensors"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = {row["model"]: row for row in metrics["rows"]}
    assert set(rows) == {"teacher", "scratch", "kd", "dkd", "fitnet", "mlp-dist"}
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and row["parameters"] > 0 and row["latency_ms_per_example"] > 0
    assert rows["teacher"]["agreement"] == 1.0 and rows["kd"]["kl_to_teacher"] >= 0
    assert rows["mlp-dist"]["parameters"] == 28 * 28 * 8 + 8 + 8 * 10 + 10
    assert set(metrics["reliability"]) == set(rows)
    history = (run_dir / "students" / "dkd" / "metrics.jsonl").read_text().splitlines()
    assert {"ce", "dkd_target", "dkd_nontarget"} <= set(json.loads(history[-1]))
    assert "Agreement with teacher" in (run_dir / "report.md").read_text()
    assert any("training the teacher" in line for line in lines)
    assert (teacher_cache_dir(tiny_config) / "model.safetensors").is_file()

    # The teacher is now cached; resuming the finished run only re-evaluates.
    again: list[str] = []
    load_or_train_teacher(tiny_config, *load_data(tiny_config), log=again.append)
    assert any("teacher loaded from cache" in line for line in again)
    resumed: list[str] = []
    assert run_classifier(tiny_config, resume=True, run_dir=run_dir, log=resumed.append) == run_dir
    assert sum("already finished" in line for line in resumed) == 5

    (run_dir / "report.md").unlink()
    assert evaluate_classifier_run(run_dir, log=lambda _: None) == run_dir  # from the folder alone
    again_rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    assert [row["model"] for row in again_rows][:2] == ["teacher", "scratch"]
    assert again_rows[1]["accuracy"] == pytest.approx(rows["scratch"]["accuracy"])
    assert (run_dir / "report.md").is_file()


def test_students_start_from_the_same_weights(tiny_config, tmp_path):
    from kdkit.pipelines.classifier import build_student

    torch.manual_seed(tiny_config.train.seed)
    a = build_student(tiny_config)
    torch.manual_seed(tiny_config.train.seed)
    b = build_student(tiny_config)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
