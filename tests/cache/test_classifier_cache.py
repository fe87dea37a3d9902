"""Durable classifier teacher-logit cache: computed once, verified, keyed by teacher and data."""

from pathlib import Path

import torch
from torch import nn

from kdkit.cache.classifier import WithTeacherLogits, cached_teacher_logits
from kdkit.data.fashion_mnist import TensorClassificationDataset


def _setup(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    data = TensorClassificationDataset(torch.randn(50, 1, 4, 4), torch.randint(0, 10, (50,)))
    return teacher, data


def test_computed_once_then_read_back_exactly(kdkit_cache):
    teacher, data = _setup()
    first, info = cached_teacher_logits(teacher, data, batch_size=16, log=lambda m: None)
    assert not info["hit"] and first.shape == (50, 10)
    with torch.no_grad():
        torch.testing.assert_close(first, teacher(torch.stack([data[i]["inputs"] for i in range(50)])))
    again, info2 = cached_teacher_logits(teacher, data, log=lambda m: None)
    assert info2["hit"] and torch.equal(first, again)
    sample = WithTeacherLogits(data, again)[7]
    assert torch.equal(sample["teacher_logits"], first[7]) and torch.equal(
        sample["inputs"], data[7]["inputs"]
    )


def test_another_teacher_or_data_gets_its_own_cache_and_damage_is_recomputed(kdkit_cache):
    teacher, data = _setup()
    _, info = cached_teacher_logits(teacher, data, log=lambda m: None)
    other_teacher, _ = _setup(seed=1)
    _, other = cached_teacher_logits(other_teacher, data, log=lambda m: None)
    assert not other["hit"] and other["path"] != info["path"]
    _, other_data = _setup()
    other_data.inputs[0, 0, 0, 0] += 1.0
    _, moved = cached_teacher_logits(teacher, other_data, log=lambda m: None)
    assert not moved["hit"] and moved["path"] != info["path"]
    # flip a byte of the stored logits: detected, reported, recomputed
    path = Path(info["path"])
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    messages = []
    logits, again = cached_teacher_logits(teacher, data, log=messages.append)
    assert not again["hit"] and "checksum" in messages[0]
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(torch.stack([data[i]["inputs"] for i in range(50)])))


def test_distiller_reads_cached_logits_and_the_run_caches_them(tmp_path, kdkit_cache):
    from kdkit.config.classifier import ClassifierRunConfig
    from kdkit.methods.classifier_distiller import ClassifierDistiller
    from kdkit.pipelines.classifier import run_classifier
    from tests.test_fashion_mnist_data import _fake_dataset

    teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    distiller = ClassifierDistiller(student, teacher, [{"name": "kd", "temperature": 4.0}])
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
    live = distiller({"inputs": x, "labels": y})
    with torch.no_grad():
        logits = teacher(x)
    teacher.forward = None  # a cached batch must not run the teacher
    cached = distiller({"inputs": x, "labels": y, "teacher_logits": logits})
    assert set(live) == set(cached) and all(torch.equal(live[k], cached[k]) for k in live)

    _fake_dataset(tmp_path / "data", n_train=64, n_test=32)
    fast = {"batch_size": 16, "lr": 0.01, "progress": False, "log_every": 2, "checkpoint_every": 4}
    cfg = ClassifierRunConfig.model_validate(
        {
            "kind": "classifier",
            "name": "tiny",
            "data": {"root": str(tmp_path / "data")},
            "teacher": {"arch": "cnn", "params": {"width": 4, "stages": 2}, "train": {"steps": 2, **fast}},
            "student": {"arch": "cnn", "params": {"width": 2, "stages": 2}},
            "students": [{"name": "kd", "method": "kd"}],
            "train": {"steps": 2, **fast},
            "eval": {"batch_size": 16, "latency_repeats": 1},
            "output_dir": str(tmp_path / "runs"),
            "threads": 1,
        }
    )
    first, second = [], []
    run_classifier(cfg, log=first.append)
    run_classifier(cfg, log=second.append)
    assert any("teacher logits" in m and "computed" in m for m in first)
    assert any("teacher logits" in m and "read from" in m for m in second)
