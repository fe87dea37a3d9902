"""`kind: classifier` configs that name models and data by source: my own HF model on my own CSV."""

from __future__ import annotations

import csv
import json

import pytest
from pydantic import ValidationError

from kdkit.api import run_config
from kdkit.config import ConfigError, parse_run_config
from kdkit.config.any_model import AnyModelRunConfig
from kdkit.config.classifier import ClassifierRunConfig
from tests.api.hf_tiny import save_tiny, sentences


def write_csv(path, texts, labels):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "stars"])
        writer.writerows(zip(texts, labels))
    return str(path)


def config(tmp_path, **changes):
    texts = sentences(300, seed=4)
    labels = [int("good" in t or "great" in t) for t in texts]
    data = {
        "kind": "classifier",
        "name": "tiny-csv",
        "data": {"train": write_csv(tmp_path / "train.csv", texts[:240], labels[:240]),
                 "eval": write_csv(tmp_path / "test.csv", texts[240:], labels[240:]),
                 "input_column": "review", "label_column": "stars", "max_length": 16},
        "teacher": {"source": str(save_tiny(tmp_path / "teacher", layers=2)), "num_labels": 2,
                    "finetune": {"steps": 40, "batch_size": 16, "lr": 3e-3, "progress": False}},
        "student": {"from_teacher": {"keep_layers": [0]}},
        "students": [{"name": "scratch", "method": "scratch"},
                     {"name": "kd", "method": "kd", "temperature": 2.0}],
        "train": {"steps": 20, "batch_size": 16, "lr": 3e-3, "progress": False},
        "eval": {"latency_repeats": 2},
        "output_dir": str(tmp_path / "runs"),
    }
    data.update(changes)
    return data


def test_source_named_run_fine_tunes_once_and_reports(tmp_path, kdkit_cache):
    cfg = parse_run_config(config(tmp_path))
    assert isinstance(cfg, AnyModelRunConfig)
    messages: list[str] = []
    from kdkit.pipelines.any_model import run_any_model

    run_dir = run_any_model(cfg, log=messages.append)
    rows = {r["model"]: r for r in json.loads((run_dir / "metrics.json").read_text())["rows"]}
    assert set(rows) == {"teacher", "scratch", "kd"}
    test_labels = [int(r["stars"]) for r in csv.DictReader((tmp_path / "test.csv").open())]
    majority = max(sum(test_labels), len(test_labels) - sum(test_labels)) / len(test_labels)
    assert rows["teacher"]["accuracy"] > majority + 0.05  # fine-tuned: it learnt the CSV's rule
    assert rows["kd"]["parameters"] < rows["teacher"]["parameters"]
    assert (run_dir / "students" / "kd" / "model" / "config.json").is_file()
    assert any("fine-tuning" in m for m in messages)
    messages.clear()
    run_any_model(cfg, log=messages.append)
    assert any("fine-tuned teacher loaded from cache" in m for m in messages)
    assert not any("fine-tuning" in m for m in messages)

    from kdkit.api import evaluate

    (run_dir / "metrics.json").unlink()
    assert evaluate(run_dir) == run_dir  # `kdkit eval` re-evaluates from the saved students
    again = {r["model"]: r for r in json.loads((run_dir / "metrics.json").read_text())["rows"]}
    assert again["kd"]["accuracy"] == pytest.approx(rows["kd"]["accuracy"])


def test_built_in_form_still_validates_as_before():
    cfg = parse_run_config({"kind": "classifier", "students": [{"name": "s", "method": "scratch"}]})
    assert isinstance(cfg, ClassifierRunConfig)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher": {"source": "pkg:no_such_pkg/model"}}, "'no_such_pkg' is not installed"),
        ({"teacher": {"source": "x", "task": "vision"}}, "unknown task 'vision'"),
        ({"student": {"source": "x", "from_teacher": {"keep_layers": 1}}}, "exactly one of source"),
        ({"students": [{"name": "kd", "method": "kd", "temp": 1}]}, "temp"),
        ({"train": {"stepz": 1}}, "unknown field|Extra inputs"),
    ],
)
def test_config_errors_name_the_field(tmp_path, change, message):
    with pytest.raises((ValidationError, ConfigError, ValueError), match=message):
        parse_run_config(config(tmp_path, **change))


def test_missing_column_refused_at_load_time(tmp_path, kdkit_cache):
    data = config(tmp_path)
    data["data"]["label_column"] = "rating"
    with pytest.raises(ValueError, match=r"data.train: no column 'rating' \(columns: review, stars\)"):
        run_config(parse_run_config(data))
