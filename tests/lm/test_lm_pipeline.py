"""End to end on a tiny, untrained arithmetic-style teacher saved locally: run_lm writes a complete
run folder whose students reload with plain transformers, and evaluate_lm_run rewrites the report."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdkit.config.lm import LMRunConfig
from kdkit.models.lm import save_pretrained_folder
from kdkit.models.tokenizers import TokenizerMismatchError
from kdkit.pipelines.lm import build_student, evaluate_lm_run, load_teacher, run_lm
from kdkit.report import lm_results_table as results_table
from kdkit.tasks.arithmetic import arithmetic_tokenizer, build_arithmetic_lm


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run ~3× faster on one thread than on two contended ones (a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 2-layer width-16 Llama over the arithmetic characters (random weights), as an HF folder."""
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = arithmetic_tokenizer()
    model = build_arithmetic_lm(tokenizer, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
    save_pretrained_folder(model, tokenizer, folder)
    return folder


def tiny_config(teacher: str, tmp_path, **changes) -> LMRunConfig:
    data = {
        "kind": "lm",
        "name": "tiny",
        "teacher": {"source": teacher},
        "student": {"keep_layers": 1},
        "data": {
            "dataset": "arithmetic",
            "train_size": 64,
            "train_digits": [1, 2],
            "eval_digits": [1, 3],
            "eval_size": 8,
        },
        "students": [
            {"name": "fkl", "method": "supervised_kd"},
            {"name": "gkd", "method": "gkd", "lmbda": 1.0, "max_new_tokens": 8, "sampling_temperature": 0.8},
        ],
        "train": {
            "steps": 3,
            "batch_size": 4,
            "lr": 1e-3,
            "log_every": 1,
            "progress": False,
            "checkpoint_every": 2,
        },
        "eval": {"batch_size": 8, "samples": 4, "max_new_tokens": 8, "exact_match_problems": 12},
        "output_dir": str(tmp_path / "runs"),
    }
    data.update(changes)
    return LMRunConfig.model_validate(data)


def test_run_lm_writes_a_complete_run_folder(tiny_teacher, tmp_path, kdkit_cache):
    cfg = tiny_config(str(tiny_teacher), tmp_path)
    lines: list[str] = []
    run_dir = run_lm(cfg, log=lines.append)

    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["kind"] == "lm" and saved["students"][1]["lmbda"] == 1.0
    for name in ("metrics.json", "report.md", "report.html"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = {row["model"]: row for row in metrics["rows"]}
    assert list(rows) == ["teacher", "student_init", "fkl", "gkd"]
    assert rows["teacher"]["agreement"] == 1.0
    for row in rows.values():
        assert row["perplexity"] > 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert {"exact_match_d1", "exact_match_d2", "exact_match_d3"} <= set(row)
        assert row["rkl_estimate"] == pytest.approx(row["student_logp"] - row["teacher_logp"])
    assert rows["student_init"]["parameters"] < rows["teacher"]["parameters"]
    assert rows["gkd"]["generation_share"] > 0.0  # λ=1: every step sampled from the student
    assert rows["fkl"]["generation_share"] == 0.0
    assert rows["fkl"]["kd_raw"] > 0.0
    # the distillation temperature and the sampling temperature are reported separately
    assert any(
        "distillation temperature 1" in n and "sampling temperature 0.8" in n for n in metrics["notes"]
    )
    assert "Exact match, 3-digit" in (run_dir / "report.md").read_text()

    # each student: its own folder, a plain HF model that reloads without kdkit, no checkpoints left
    for name in ("fkl", "gkd"):
        folder = run_dir / "students" / name
        assert (folder / "metrics.jsonl").is_file() and not (folder / "checkpoints").exists()
        model = AutoModelForCausalLM.from_pretrained(folder / "model")
        assert model.config.num_hidden_layers == 1
        train_info = json.loads((folder / "train.json").read_text())
        assert train_info["steps"] == 3
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "students" / "fkl" / "model")
    initial, _ = build_student(cfg, *load_teacher(cfg))
    assert not torch.equal(
        trained.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight
    )

    table = results_table(metrics["rows"])
    assert "student_init" in table and "EM3" in table
    assert any("report written" in line for line in lines)

    # re-evaluation from the folder alone gives the same deterministic numbers
    (run_dir / "metrics.json").unlink()
    evaluate_lm_run(run_dir, log=lambda _: None)
    again = {row["model"]: row for row in json.loads((run_dir / "metrics.json").read_text())["rows"]}
    assert again["fkl"]["perplexity"] == pytest.approx(rows["fkl"]["perplexity"], rel=1e-5)

    # resuming a finished run skips every student
    resumed: list[str] = []
    run_lm(cfg, resume=True, run_dir=run_dir, log=resumed.append)
    assert sum("already finished" in line for line in resumed) == 2


def test_student_with_another_tokenizer_is_refused(tiny_teacher, tmp_path):
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_teacher)
    tokenizer.add_tokens(["<extra>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    model.resize_token_embeddings(len(tokenizer))
    save_pretrained_folder(model, tokenizer, other)
    cfg = tiny_config(str(tiny_teacher), tmp_path, student={"path": str(other)})
    with pytest.raises(TokenizerMismatchError, match="first difference at id 16"):
        build_student(cfg, *load_teacher(cfg))


def test_padded_student_vocabulary_is_accepted(tiny_teacher, tmp_path):
    cfg = tiny_config(
        str(tiny_teacher),
        tmp_path,
        student={
            "config": {
                "model_type": "llama",
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "vocab_size": 32,
            }
        },
    )
    student, _ = build_student(cfg, *load_teacher(cfg))
    assert student.get_output_embeddings().weight.shape[0] == 32  # teacher has 16: padding only


def test_on_policy_training_keeps_one_fixed_shape_decoder_across_steps(tiny_teacher, tmp_path, kdkit_cache):
    """Through the engine (graph_decode: true, so the fixed-shape path runs here eagerly, as a GPU
    would replay it): every step samples from the live student with the decoder of the first step
    (a hit per later step), never rebuilt, since the engine's optimizer updates weights in place."""
    from kdkit.samplers import fast_decode

    student = {"name": "gkd", "method": "gkd", "lmbda": 1.0, "max_new_tokens": 8, "graph_decode": True}
    cfg = tiny_config(str(tiny_teacher), tmp_path, students=[student])
    cfg.train.steps = 4  # (a checkpoint at step 2: saving must not replace storages either)
    fast_decode.clear_decoder_cache()
    run_lm(cfg, log=lambda _: None)
    info = fast_decode.decoder_cache_info()
    assert info["rebuilds"] == 0 and info["misses"] == 1 and info["hits"] == 3, info
