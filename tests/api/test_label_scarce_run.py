"""`data.labelled` in a classifier run: few labelled images, soft-target students use them all."""

from __future__ import annotations

import json

import pytest

from kdkit.config.classifier import ClassifierRunConfig
from kdkit.pipelines.classifier import run_classifier
from tests.test_fashion_mnist_data import _fake_dataset


def test_label_scarce_run_gives_each_student_the_data_it_can_use(tmp_path, kdkit_cache):
    _fake_dataset(tmp_path / "data", n_train=96, n_test=40)
    fast = {"batch_size": 16, "lr": 0.01, "progress": False, "log_every": 2}
    cfg = ClassifierRunConfig.model_validate({
        "kind": "classifier", "name": "scarce",
        "data": {"root": str(tmp_path / "data"), "labelled": 20},
        "teacher": {"arch": "cnn", "params": {"width": 4, "stages": 2}, "train": {"steps": 4, **fast}},
        "student": {"arch": "mlp", "params": {"hidden": [8]}},
        "students": [{"name": "scratch", "method": "scratch"}, {"name": "kd", "method": "kd"}],
        "train": {"steps": 8, **fast},
        "eval": {"batch_size": 16, "latency_repeats": 2},
        "output_dir": str(tmp_path / "runs"), "threads": 1,
    })
    lines: list[str] = []
    run_dir = run_classifier(cfg, log=lines.append)
    assert any("20 labelled of 96 training images" in line for line in lines)
    rows = {r["model"]: r for r in json.loads((run_dir / "metrics.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "scratch", "kd"}
    kd = [json.loads(x) for x in (run_dir / "students" / "kd" / "metrics.jsonl").read_text().splitlines()]
    # the kd student sees mostly unlabelled images: about 20/96 of each batch is labelled
    labelled = sum(r["diag/labelled"] for r in kd) / len(kd)
    assert 0.05 < labelled < 0.5
    assert {"ce", "kd"} <= set(kd[-1])
    history = (run_dir / "students" / "scratch" / "metrics.jsonl").read_text().splitlines()
    scratch = [json.loads(x) for x in history]
    assert "diag/labelled" not in scratch[-1]  # the plain distiller on the 20 labelled images
    assert "Label-scarce" in (run_dir / "report.md").read_text()


def test_labelled_must_leave_unlabelled_images(tmp_path, kdkit_cache):
    _fake_dataset(tmp_path / "data", n_train=32, n_test=8)
    cfg = ClassifierRunConfig.model_validate({
        "kind": "classifier", "data": {"root": str(tmp_path / "data"), "labelled": 32},
        "teacher": {"arch": "mlp", "params": {"hidden": [4]}, "train": {"steps": 1, "batch_size": 8,
                                                                       "progress": False}},
        "student": {"arch": "mlp", "params": {"hidden": [4]}},
        "students": [{"name": "kd", "method": "kd"}],
        "train": {"steps": 1, "batch_size": 8, "progress": False},
        "output_dir": str(tmp_path / "runs"),
    })
    with pytest.raises(ValueError, match="data.labelled=32 leaves no unlabelled images"):
        run_classifier(cfg, log=lambda _: None)
