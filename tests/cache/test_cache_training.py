"""Training from a teacher-logit cache: same losses as the live teacher where the cache is exact, the
`caches:` section of a run config, `kdkit cache`, and refusals (on-policy, another teacher)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from kdkit.cache import ManifestMismatchError
from kdkit.cache.batch import IndexedCollate, IndexedSamples
from kdkit.cli import main as cli_main
from kdkit.config.lm import LMRunConfig
from kdkit.models.lm import save_pretrained_folder
from kdkit.pipelines.cache import build_caches, cache_folder, resolve_student
from kdkit.pipelines.lm import build_distiller, build_student, load_lm_data, load_teacher, run_lm
from kdkit.tasks.arithmetic import arithmetic_tokenizer, build_arithmetic_lm


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = arithmetic_tokenizer()
    model = build_arithmetic_lm(tokenizer, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    save_pretrained_folder(model, tokenizer, folder)
    return folder


def config_dict(teacher, tmp_path, students, caches):
    return {
        "kind": "lm",
        "name": "tiny",
        "teacher": {"source": str(teacher)},
        "student": {"keep_layers": 1},
        "data": {
            "dataset": "arithmetic",
            "train_size": 48,
            "train_digits": [1, 2],
            "eval_digits": [1, 2],
            "eval_size": 8,
        },
        "caches": caches,
        "students": students,
        "train": {
            "steps": 3,
            "batch_size": 4,
            "lr": 1e-3,
            "log_every": 1,
            "progress": False,
            "checkpoint_every": 3,
        },
        "eval": {"batch_size": 8, "samples": 2, "max_new_tokens": 4, "exact_match_problems": 4},
        "output_dir": str(tmp_path / "runs"),
    }


CACHES = {
    "full": {"mode": "topk", "k": 16, "samples_per_shard": 16},  # k = V: exact with the tail
    "dense": {"mode": "dense", "samples_per_shard": 16},
    "top4": {"mode": "topk", "k": 4, "samples_per_shard": 16, "values": "uint8"},
    "sampled": {"mode": "sampled", "draws": 12, "samples_per_shard": 16},
}


def _kd(cfg, student_entry, caches_built, batch, teacher, tokenizer, initial):
    from kdkit.config.lm import LMStudentRun

    student_cfg = resolve_student(LMStudentRun.model_validate(student_entry), caches_built)
    distiller = build_distiller(student_cfg, initial, teacher, tokenizer)
    expected = "CacheSignal" if "cache" in student_entry else "HiddenSignal"  # fused: auto
    assert type(distiller.signal).__name__ == expected
    return distiller(batch)["kd"]


@pytest.mark.parametrize("divergence", ["fkl", "jsd", "rkl"])
def test_exact_caches_give_the_live_teachers_loss(tiny_teacher, tmp_path, kdkit_cache, divergence):
    cfg = LMRunConfig.model_validate(
        config_dict(tiny_teacher, tmp_path, [{"name": "x", "method": "supervised_kd"}], CACHES)
    )
    teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    data = load_lm_data(cfg, tokenizer)
    build_caches(
        cfg,
        ["full", "dense"],
        teacher=teacher,
        tokenizer=tokenizer,
        train=data.train,
        collate=data.collate,
        progress=False,
        log=lambda _: None,
    )
    folders = {name: cache_folder(cfg, name) for name in ("full", "dense")}
    initial, _ = build_student(cfg, teacher, tokenizer)
    batch = IndexedCollate(data.collate)([IndexedSamples(data.train)[i] for i in (5, 0, 31, 12)])
    entry = {"name": "x", "method": "supervised_kd", "divergence": divergence}
    live = _kd(cfg, entry, folders, batch, teacher, tokenizer, initial)
    for name in ("full", "dense"):
        cached = _kd(cfg, entry | {"cache": name}, folders, batch, teacher, tokenizer, initial)
        torch.testing.assert_close(cached, live, atol=2e-3, rtol=2e-3)


def test_run_trains_students_from_caches_it_builds(tiny_teacher, tmp_path, kdkit_cache):
    students = [
        {"name": "live", "method": "supervised_kd"},
        {"name": "top4", "method": "supervised_kd", "cache": "top4"},
        {"name": "top4_rkl", "method": "supervised_kd", "cache": "top4", "divergence": "rkl"},
        {"name": "sampled", "method": "supervised_kd", "cache": "sampled"},
    ]
    cfg = LMRunConfig.model_validate(config_dict(tiny_teacher, tmp_path, students, CACHES))
    lines: list[str] = []
    run_dir = run_lm(cfg, log=lines.append)
    assert any("cache top4" in line for line in lines) and any("cache sampled" in line for line in lines)
    for name in ("top4", "sampled"):
        assert (cache_folder(cfg, name) / "index.json").is_file()
    for student in students:
        info = json.loads((run_dir / "students" / student["name"] / "train.json").read_text())
        assert info["steps"] == 3 and torch.isfinite(torch.tensor(info["final_losses"]["kd"]))
    # not built: no student uses them
    assert not (cache_folder(cfg, "dense") / "manifest.json").exists()


def test_cli_builds_caches_and_refuses_on_policy_and_another_teacher(
    tiny_teacher, tmp_path, kdkit_cache, capsys
):
    students = [{"name": "s", "method": "supervised_kd", "cache": "top4"}]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_dict(tiny_teacher, tmp_path, students, {"top4": CACHES["top4"]})))
    assert cli_main(["cache", str(config)]) == 0
    cfg = LMRunConfig.model_validate(yaml.safe_load(config.read_text()))
    assert (cache_folder(cfg, "top4") / "index.json").is_file()
    assert cli_main(["cache", str(config), "--only", "top4"]) == 0  # complete: nothing recomputed
    assert "0 shards written, 3 reused" in capsys.readouterr().out

    bad = config_dict(
        tiny_teacher,
        tmp_path,
        [{"name": "s", "method": "on_policy", "cache": "top4"}],
        {"top4": CACHES["top4"]},
    )
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert cli_main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "dataset's sequences only" in capsys.readouterr().err

    # another teacher pointed at the same cache folder: refused, saying what differs
    other = tmp_path / "other_teacher"
    tokenizer = arithmetic_tokenizer()
    save_pretrained_folder(
        build_arithmetic_lm(
            tokenizer, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, seed=5
        ),
        tokenizer,
        other,
    )
    moved = config_dict(
        other,
        tmp_path,
        [{"name": "s", "method": "supervised_kd", "cache": str(cache_folder(cfg, "top4"))}],
        {},
    )
    with pytest.raises(ManifestMismatchError, match="teacher.weights_sha256"):
        run_lm(LMRunConfig.model_validate(moved), log=lambda _: None)


def test_the_recipe_validates():
    from pathlib import Path

    from kdkit.config import load_run_config

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "arithmetic-logit-cache.yaml"
    cfg = load_run_config(recipe)
    assert set(cfg.caches) == {"top8", "sampled12"}
    assert {s.name for s in cfg.students if (s.model_extra or {}).get("cache")} == {"top8_tail", "sampled12"}


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_concurrently(tiny_teacher, tmp_path, kdkit_cache):
    """`kdkit cache` under a launcher (RANK, WORLD_SIZE): two processes at once give the same cache."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    students = [{"name": "s", "method": "supervised_kd", "cache": "sampled"}]
    caches = {"sampled": CACHES["sampled"] | {"path": str(tmp_path / "parallel")}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_dict(tiny_teacher, tmp_path, students, caches)))
    src = str(Path(__file__).resolve().parents[2] / "src")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kdkit.cli", "cache", str(config)],
            env=dict(os.environ, PYTHONPATH=src, RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all("2 shards written" in out or "1 shards written" in out for out in outputs)  # 3 shards: 2 + 1
    assert cli_main(["cache", str(config), "caches.sampled.path=" + str(tmp_path / "single")]) == 0
    single = sorted((tmp_path / "single" / "shards").iterdir())
    parallel = sorted((tmp_path / "parallel" / "shards").iterdir())
    assert [p.name for p in single] == [p.name for p in parallel]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(single, parallel))
    assert (tmp_path / "parallel" / "index.json").is_file()


@pytest.mark.parametrize("cache", ["top4", "sampled"])
@pytest.mark.parametrize("ce_ratio", [0.0, 0.5])
def test_fused_sparse_path_equals_the_logits_path(tiny_teacher, tmp_path, kdkit_cache, cache, ce_ratio):
    """The objective computes sparse targets from hidden states in chunks (no [N, V] tensor) unless
    the student's logits exist already: both give the same terms and the same parameter gradients."""
    from kdkit.objectives.lm.base import StudentView
    from kdkit.objectives.lm.ce import student_cross_entropy
    from kdkit.objectives.lm.divergence import DivergenceObjective, DivergenceParams
    from kdkit.signals.cache import CacheSignal, CacheSignalParams

    cfg = LMRunConfig.model_validate(
        config_dict(tiny_teacher, tmp_path, [{"name": "x", "method": "supervised_kd"}], CACHES)
    )
    teacher, tokenizer = load_teacher(cfg, log=lambda _: None)
    data = load_lm_data(cfg, tokenizer)
    build_caches(
        cfg,
        [cache],
        teacher=teacher,
        tokenizer=tokenizer,
        train=data.train,
        collate=data.collate,
        progress=False,
        log=lambda _: None,
    )
    student, _ = build_student(cfg, teacher, tokenizer)
    batch = IndexedCollate(data.collate)([IndexedSamples(data.train)[i] for i in (5, 0, 31, 12)])
    target = CacheSignal(CacheSignalParams(cache=str(cache_folder(cfg, cache))))(batch, teacher=None)
    objective = DivergenceObjective(DivergenceParams(chunk_size=5))
    results = []
    for materialise in (False, True):
        student.zero_grad()
        view = StudentView(student, batch)
        if materialise:
            view.logits  # noqa: B018 - the logits exist: the objective uses them
        terms = objective(view, batch, target, ce_ratio=ce_ratio)
        assert view.has_logits == materialise  # the fused path never computed the logits
        if "ce" not in terms and ce_ratio:  # the distiller adds CE from the logits
            terms["ce"] = student_cross_entropy(view, batch["labels"])
        (terms["kd"] + ce_ratio * terms.get("ce", 0.0)).backward()  # fused: "ce" is detached
        grads = [p.grad.clone() for p in student.parameters()]
        results.append(({k: v.detach() for k, v in terms.items()}, grads))
    (fused, fused_grads), (plain, plain_grads) = results
    assert fused.keys() == plain.keys() == ({"kd", "ce"} if ce_ratio else {"kd"})
    for key in fused:
        torch.testing.assert_close(fused[key], plain[key], atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
