"""A `privacy:` section in an LM run config trains every student with DP-SGD, end to end; methods
that normalise over the batch are refused under it, and DP methods without it."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.config.lm import LMRunConfig
from kdkit.models.lm import save_pretrained_folder
from kdkit.pipelines.lm import run_lm
from kdkit.privacy import epsilon
from kdkit.tasks.arithmetic import arithmetic_tokenizer, build_arithmetic_lm


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = arithmetic_tokenizer()
    model = build_arithmetic_lm(tokenizer, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    save_pretrained_folder(model, tokenizer, folder)
    return folder


def _config(teacher, tmp_path, students, privacy=None) -> dict:
    return {
        "kind": "lm", "name": "private", "teacher": {"source": str(teacher)}, "student": {"keep_layers": 1},
        "data": {"dataset": "arithmetic", "train_size": 48, "train_digits": [1, 2], "eval_digits": [1, 2],
                 "eval_size": 8},
        "students": students,
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False,
                  "checkpoint_every": 2},
        "eval": {"batch_size": 8, "samples": 2, "max_new_tokens": 6, "exact_match_problems": 4},
        "output_dir": str(tmp_path / "runs"),
        **({"privacy": privacy} if privacy else {}),
    }


def test_methods_and_privacy_must_match(teacher_folder, tmp_path):
    with pytest.raises(ValueError, match="dp_opd, dp_kd or dp_ft"):
        LMRunConfig.model_validate(_config(teacher_folder, tmp_path, [{"name": "g", "method": "gkd"}],
                                           {"target_epsilon": 2.0}))
    with pytest.raises(ValueError, match="add a privacy: section"):
        LMRunConfig.model_validate(_config(teacher_folder, tmp_path, [{"name": "o", "method": "dp_opd"}]))
    with pytest.raises(ValueError, match="exactly one"):
        LMRunConfig.model_validate(_config(teacher_folder, tmp_path, [{"name": "o", "method": "dp_opd"}],
                                           {"target_epsilon": 2.0, "noise_multiplier": 1.0}))
    cfg = LMRunConfig.model_validate(_config(
        teacher_folder, tmp_path, [{"name": "o", "method": "dp_opd", "beta": 0.3, "prefix_fraction": 0.5}],
        {"target_epsilon": 2.0}))
    params = cfg.students[0].method_params()
    assert params.divergence == "jsd" and params.divergence_params == {"beta": 0.3}


def test_private_run_end_to_end(teacher_folder, tmp_path, kdkit_cache):
    torch.set_num_threads(1)
    students = [{"name": "opd", "method": "dp_opd", "max_new_tokens": 6},
                {"name": "kd", "method": "dp_kd", "divergence": "fkl"},
                {"name": "ft", "method": "dp_ft"}]
    cfg = LMRunConfig.model_validate(_config(teacher_folder, tmp_path, students,
                                             {"noise_multiplier": 1.0, "max_grad_norm": 0.5}))
    run_dir = run_lm(cfg, log=lambda _: None)
    q, delta = 8 / 48, 1 / 48
    rows = {row["model"]: row for row in json.loads((run_dir / "metrics.json").read_text())["rows"]}
    notes = json.loads((run_dir / "metrics.json").read_text())["notes"]
    for name in ("opd", "kd", "ft"):
        folder = run_dir / "students" / name
        assert rows[name]["epsilon"] == pytest.approx(epsilon(q, 1.0, 2, delta))
        info = json.loads((folder / "train.json").read_text())
        assert info["privacy"]["noise_multiplier"] == 1.0 and info["steps"] == 2
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert history[-1]["privacy/epsilon"] == pytest.approx(rows[name]["epsilon"])
        assert any(n.startswith(f"Privacy of {name}:") and "Not covered" in n for n in notes)
    assert "epsilon" not in rows["teacher"]
    assert "ε (DP-SGD)" in (run_dir / "report.md").read_text()
