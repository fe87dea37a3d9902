"""`kind: text` end to end through the CLI, against the project's own OpenAI-compatible server (a
real tiny LM on 127.0.0.1): a report and a saved student; resume and `kdkit eval` never ask the
teacher again; the API key never reaches a file or the logs; config errors name the field."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from kdkit.cli import main
from kdkit.config import parse_run_config, validation_message
from kdkit.config.text import TextRunConfig
from tests.teachers.server import TinyLMServer, tiny_arithmetic_lm

KEY_ENV = "KDKIT_TEST_TEXT_KEY"
SECRET = "sk-kdkit-test-5f3a9c1e-never-written"
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 128,
}


def api_config(url: str, output_dir: Path, **changes) -> dict:
    data = {
        "kind": "text",
        "name": "tiny-api",
        "teacher": {"api": {"base_url": url, "model": "tiny", "api_key_env": KEY_ENV, "max_concurrency": 2}},
        "student": {"config": TINY_LLAMA, "tokenizer": "arithmetic"},
        "data": {
            "dataset": "arithmetic",
            "train_size": 10,
            "train_digits": [1, 2],
            "eval_digits": [1, 2],
            "eval_size": 4,
        },
        "students": [
            {"name": "seqkd", "method": "text_seqkd", "steps": 3, "batch_size": 4, "teacher_max_tokens": 12}
        ],
        "eval": {"exact_match_problems": 6, "samples": 2, "max_new_tokens": 12, "batch_size": 8},
        "progress": False,
        "threads": 1,
        "output_dir": str(output_dir),
    }
    return data | changes


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    model, tokenizer = tiny_arithmetic_lm(seed=0)
    with TinyLMServer(model, tokenizer, model_name="tiny", api_key=SECRET) as running:
        yield running


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_cli_run_resume_and_eval_against_a_served_teacher(server, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    config = write(tmp_path / "run.yaml", api_config(server.url, tmp_path / "runs"))
    assert main(["run", str(config)]) == 0
    (run_dir,) = (tmp_path / "runs" / "tiny-api").iterdir()
    first_calls = server.answered()
    assert first_calls > 0

    # the report, the saved student (a plain HF folder), the counts from the store
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = {row["model"]: row for row in metrics["rows"]}
    assert set(rows) == {"student_init", "seqkd"}
    assert "exact_match_d1" in rows["seqkd"] and rows["seqkd"]["perplexity"] > 1
    store = metrics["extra"]["store"]
    assert store["responses"] == store["prompts"] == rows["seqkd"]["teacher_responses"] == first_calls
    assert store["tokens"] > 0 and len(metrics["extra"]["samples"]["seqkd"]) == 2
    model = AutoModelForCausalLM.from_pretrained(run_dir / "students" / "seqkd" / "model")
    assert model.config.num_hidden_layers == 1
    assert not list((run_dir / "students" / "seqkd").glob("**/checkpoints"))

    # resume: the finished student is skipped; no request reaches the teacher
    assert main(["run", str(config), "--resume"]) == 0
    assert server.answered() == first_calls
    # an unfinished student (no saved model, no checkpoints left) retrains from the stored responses
    shutil.rmtree(run_dir / "students" / "seqkd" / "model")
    assert main(["run", str(config), "--resume"]) == 0
    assert server.answered() == first_calls
    assert json.loads((run_dir / "students" / "seqkd" / "train.json").read_text())["teacher_responses"] == 0
    assert (run_dir / "students" / "seqkd" / "model" / "config.json").is_file()

    # kdkit eval rewrites the report without the teacher (nor its key)
    monkeypatch.delenv(KEY_ENV)
    (run_dir / "report.html").unlink()
    assert main(["eval", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file() and server.answered() == first_calls

    # the key never appears in any file the runs wrote, nor in their output or logs
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    assert json.loads((run_dir / "config.json").read_text())["teacher"]["api"]["api_key_env"] == KEY_ENV


def test_a_wrong_or_missing_key_is_one_clear_line_that_never_echoes_it(server, tmp_path, monkeypatch, capsys):
    config = write(tmp_path / "run.yaml", api_config(server.url, tmp_path / "runs"))
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-123456")
    assert main(["run", str(config)]) == 1
    err = capsys.readouterr().err
    assert "kdkit: teacher error:" in err and "401" in err and "sk-wrong-key-123456" not in err
    monkeypatch.delenv(KEY_ENV)
    assert main(["run", str(config)]) == 1
    assert f"the environment variable {KEY_ENV} (api_key_env) is not set" in capsys.readouterr().err


def error_of(data: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_run_config(data)
    return validation_message(caught.value)


@pytest.mark.parametrize(
    ("change", "location", "words"),
    [
        ({"teacher": {}}, "teacher", "exactly one of api, local or vllm; got none"),
        (
            {
                "teacher": {
                    "api": {"base_url": "http://h/v1", "model": "m"},
                    "local": {"source": "arithmetic"},
                }
            },
            "teacher",
            "got api and local",
        ),
        ({"student": {"keep_layers": 2}}, "student", "keep_layers derives the student from a local teacher"),
        ({"student": {"config": TINY_LLAMA}}, "student", "needs student.tokenizer"),
        ({"students": [{"name": "a", "method": "gkd"}]}, "students.0.method", "not a black-box text method"),
        (
            {"students": [{"name": "a", "method": "text_seqkd", "steps": 0}]},
            "students.0.steps",
            "greater than 0",
        ),
        ({"students": [{"name": "a", "method": "soda", "bta": 0.1}]}, "students.0.bta", "not a parameter"),
        ({"data": {"dataset": "jsonl"}}, "data", "needs a path"),
    ],
)
def test_config_errors_name_the_field(tmp_path, change, location, words):
    message = error_of(api_config("http://127.0.0.1:9/v1", tmp_path) | change)
    assert message.startswith(f"config error at {location}: ") and words in message


def test_cli_refuses_a_bad_config_before_any_work(tmp_path, capsys):
    config = write(tmp_path / "bad.yaml", api_config("http://127.0.0.1:9/v1", tmp_path) | {"teacher": {}})
    assert main(["run", str(config)]) == 2
    assert "config error at teacher" in capsys.readouterr().err


def test_the_recipe_and_the_documented_api_config_validate(tmp_path):
    root = Path(__file__).resolve().parents[2]
    recipe = parse_run_config(yaml.safe_load((root / "recipes" / "arithmetic-blackbox.yaml").read_text()))
    assert isinstance(recipe, TextRunConfig) and recipe.teacher.form == "local"
    assert {s.method for s in recipe.students} == {"text_seqkd", "soda", "gen_ssd"}
    docs = (root / "docs" / "teachers.md").read_text().split("## From the command line: `kind: text`")[1]
    documented = parse_run_config(yaml.safe_load(docs.split("```yaml")[1].split("```")[0]))
    assert documented.teacher.form == "api" and documented.teacher.api.api_key_env == "EXAMPLE_API_KEY"


@pytest.mark.parametrize(
    "student",
    [{"keep_layers": 1, "intermediate_size": 8}, {"config": TINY_LLAMA | {"intermediate_size": 8}}],
    ids=["derived", "config-with-the-teachers-tokenizer"],
)
def test_local_teacher_and_jsonl_prompts(tmp_path, student):
    """A local teacher (a model folder) generates in-process (and derives a keep_layers student);
    jsonl prompts train, held-out completions give the perplexity; the teacher is evaluated too."""
    from kdkit.models.lm import save_pretrained_folder
    from kdkit.pipelines.text import run_text
    from kdkit.tasks.arithmetic import arithmetic_dataset

    model, tokenizer = tiny_arithmetic_lm(seed=1)
    save_pretrained_folder(model, tokenizer, tmp_path / "teacher")
    records = arithmetic_dataset(12, (1, 2), seed=3)
    train = [{"prompt": r["prompt"]} for r in records[:8]] + [{"prompt": records[0]["prompt"]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    held_out = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records[8:]]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    cfg = parse_run_config(
        api_config("http://unused/v1", tmp_path / "runs")
        | {
            "teacher": {"local": {"source": str(tmp_path / "teacher"), "batch_size": 4}},
            "student": student,
            "data": {
                "dataset": "jsonl",
                "path": str(tmp_path / "train.jsonl"),
                "eval_path": str(tmp_path / "eval.jsonl"),
            },
        }
    )
    run_dir = run_text(cfg, log=lambda _: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = {row["model"]: row for row in metrics["rows"]}
    assert set(rows) == {"teacher", "student_init", "seqkd"}
    assert all(row["perplexity"] > 1 and "exact_match_d1" not in row for row in rows.values())
    assert rows["seqkd"]["parameters"] < rows["teacher"]["parameters"]
    store = metrics["extra"]["store"]
    assert store["teacher"]["teacher_id"].startswith("local:")
    assert (
        store["prompts"] == store["responses"] == rows["seqkd"]["teacher_responses"] == 8
    )  # duplicate asked once


def test_a_jsonl_record_without_a_prompt_is_named(tmp_path):
    from kdkit.pipelines.text import load_text_data

    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1="}\n{"text": "no prompt"}\n{"prompt": "2+2="}\n')
    cfg = parse_run_config(
        api_config("http://unused/v1", tmp_path)
        | {"data": {"dataset": "jsonl", "path": str(tmp_path / "train.jsonl"), "eval_size": 1}}
    )
    with pytest.raises(ValueError, match=r"train.jsonl: record 2 needs a \"prompt\" string"):
        load_text_data(cfg)
