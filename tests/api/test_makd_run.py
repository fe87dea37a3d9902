"""`method: makd` in a `kdkit run` config: a tiny BERT teacher, layer-selected and low-rank students,
from a YAML file end to end; parameter and layer-mapping errors name the field."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from pydantic import ValidationError

from kdkit.api import run
from kdkit.config import ConfigError, load_run_config, parse_run_config
from tests.api.hf_tiny import save_tiny, sentences
from tests.api.test_config_any_model import write_csv


def makd_config(tmp_path, **changes):
    texts = sentences(120, seed=5)
    labels = [int("good" in t or "great" in t) for t in texts]
    data = {
        "kind": "classifier",
        "name": "tiny-makd",
        "data": {"train": write_csv(tmp_path / "train.csv", texts[:96], labels[:96]),
                 "eval": write_csv(tmp_path / "test.csv", texts[96:], labels[96:]),
                 "input_column": "review", "label_column": "stars", "max_length": 12},
        "teacher": {"source": str(save_tiny(tmp_path / "teacher", layers=3)), "num_labels": 2},
        "student": {"from_teacher": {"keep_layers": [0, 2]}},
        "students": [
            {"name": "kd", "method": "makd", "attn_weight": 0, "hidden_weight": 0, "attn_out_weight": 0,
             "ffn_out_weight": 0},
            {"name": "makd", "method": "makd", "layer_mapping": [0, 2], "attn_weight": 2.0},
            {"name": "makd-last", "method": "makd", "layer_mapping": "last:1"},
            {"name": "lowrank", "method": "makd", "model": {"from_teacher": {"budget": 0.6}}},
            {"name": "scratch", "method": "makd", "kd_weight": 0, "attn_weight": 0, "hidden_weight": 0,
             "attn_out_weight": 0, "ffn_out_weight": 0,
             "model": {"from_teacher": {"keep_layers": [0, 2], "copy_weights": False}}},
        ],
        "train": {"steps": 3, "batch_size": 8, "lr": 1e-3, "progress": False, "log_every": 1},
        "eval": {"latency_repeats": 1},
        "output_dir": str(tmp_path / "runs"),
    }
    data.update(changes)
    return data


@pytest.mark.slow  # five students, evaluation and `kdkit eval`: ~50 s on a loaded 2-core CPU
def test_makd_runs_from_a_yaml_config(tmp_path, kdkit_cache):
    path = tmp_path / "makd.yaml"
    path.write_text(yaml.safe_dump(makd_config(tmp_path)))
    run_dir = run(path)
    rows = {r["model"]: r for r in json.loads((run_dir / "metrics.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "kd", "makd", "makd-last", "lowrank", "scratch"}
    assert rows["lowrank"]["parameters"] <= 0.6 * rows["teacher"]["parameters"]

    def logged(name):
        history = [json.loads(line) for line in (run_dir / "students" / name / "metrics.jsonl").open()]
        return set().union(*(h.keys() for h in history))

    # every aspect weighted and logged; the logit-KD arm runs no feature term; scratch no teacher term
    makd_keys = logged("makd")
    for term in ("kd", "ce", "attn_kl", "hidden_mse", "attn_out_mse", "ffn_out_mse"):
        assert any(k.endswith(term) for k in makd_keys), (term, makd_keys)
    assert not any("attn_kl" in k for k in logged("kd")) and any(k.endswith("kd") for k in logged("kd"))
    assert not any(k.endswith("kd") or "attn_kl" in k for k in logged("scratch"))
    record = json.loads((run_dir / "students" / "makd" / "distill.json").read_text())
    assert record["method_params"]["layer_mapping"] == [0, 2]
    assert record["method_params"]["attn_weight"] == 2.0

    # the trained students reload: a layer-selected one with plain transformers, the low-rank one
    # through load_student; `kdkit eval` re-evaluates both to the same accuracy
    from transformers import AutoModelForSequenceClassification

    from kdkit.api import evaluate

    plain = AutoModelForSequenceClassification.from_pretrained(run_dir / "students" / "makd" / "model")
    assert plain.config.num_hidden_layers == 2
    (run_dir / "metrics.json").unlink()
    evaluate(run_dir)
    again = {r["model"]: r for r in json.loads((run_dir / "metrics.json").read_text())["rows"]}
    assert again["lowrank"]["accuracy"] == pytest.approx(rows["lowrank"]["accuracy"])
    assert again["makd"]["accuracy"] == pytest.approx(rows["makd"]["accuracy"])


def test_makd_learns_the_teachers_features(tmp_path, kdkit_cache):
    """The feature terms fall while training (they are optimised, not just logged)."""
    cfg = makd_config(tmp_path)
    cfg["students"] = [{"name": "makd", "method": "makd", "layer_mapping": [0, 2], "kd_weight": 0,
                        "ce_weight": 0,
                        "model": {"from_teacher": {"keep_layers": [0, 2], "copy_weights": False}}}]
    cfg["train"] = {"steps": 25, "batch_size": 16, "lr": 3e-3, "progress": False, "log_every": 1}
    cfg["eval"] = {"latency_repeats": 1}
    cfg["data"]["eval"] = None
    from kdkit.api import run_config

    torch.manual_seed(0)
    run_dir = run_config(parse_run_config(cfg))
    history = [json.loads(line) for line in (run_dir / "students" / "makd" / "metrics.jsonl").open()]
    hidden = [h[k] for h in history for k in h if k.endswith("hidden_mse") and "raw" not in k]
    assert len(hidden) >= 10 and sum(hidden[-5:]) < 0.5 * sum(hidden[:5])


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"layer_mapping": "lastt:2"}, r"(?s)layer_mapping.*'uniform', 'last:K'"),
        ({"layer_mapping": [[0, 1, 2]]}, r"(?s)layer_mapping.*\[student layer, teacher layer\]"),
        ({"attn_weigth": 1.0}, "attn_weigth"),
        ({"attn_weight": -1.0}, "attn_weight"),
    ],
)
def test_makd_parameters_are_checked_when_the_config_loads(tmp_path, student, message):
    cfg = makd_config(tmp_path, students=[{"name": "m", "method": "makd", **student}])
    with pytest.raises((ValidationError, ConfigError, ValueError), match=message):
        parse_run_config(cfg)


def test_layer_mapping_out_of_range_names_the_field(tmp_path, kdkit_cache):
    cfg = makd_config(tmp_path, students=[{"name": "m", "method": "makd", "layer_mapping": [0, 7]}])
    with pytest.raises(ValueError, match=r"layer_mapping \[0, 7\]: teacher layer 7 is out of range.*3-layer"):
        from kdkit.api import run_config

        run_config(parse_run_config(cfg))


def test_makd_refused_by_the_tensor_pipeline():
    errors = (ValidationError, ConfigError, ValueError)
    with pytest.raises(errors, match=r"(?s)students\[0\].*teacher.source"):
        parse_run_config({"kind": "classifier", "students": [{"name": "m", "method": "makd"}]})


def test_recipe_validates():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "minilm-rotten-tomatoes-students.yaml"
    cfg = load_run_config(recipe)
    methods = {s.name: s.method for s in cfg.students}
    assert set(methods.values()) == {"makd"} and len(methods) == 12
