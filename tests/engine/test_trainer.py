"""The training loop in one process: teacher isolation, accumulation, logging, checkpoints, resume."""

import importlib.util
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdkit.engine import CrossEntropyDistiller, Distiller, TrainResult, train
from kdkit.engine.checkpoint import list_checkpoints
from tests.engine.tiny_run import TinyDataset, TinyKD, make_models, tiny_config


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def student_weights(distiller):
    return {k: v.detach().clone() for k, v in distiller.student.state_dict().items()}


def test_teacher_gets_no_grads_stays_eval_and_the_callers_object_is_trained(tmp_path):
    student, teacher = make_models()
    distiller = TinyKD(student, teacher)
    teacher_before = [p.clone() for p in teacher.parameters()]
    student_before = student_weights(distiller)

    result = train(distiller, TinyDataset(), tiny_config(steps=6), tmp_path)

    assert isinstance(result, TrainResult) and result.steps == 6 and result.resumed_from is None
    assert distiller.calls == 6
    assert not distiller.teacher_seen_training and not distiller.teacher_seen_requires_grad
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    # the caller's own distiller holds the trained student weights
    after = student_weights(distiller)
    assert any(not torch.equal(student_before[k], after[k]) for k in after)
    saved = load_file(list_checkpoints(tmp_path)[-1] / "model.safetensors")
    assert all(torch.equal(saved[f"student.{k}"], v) for k, v in after.items())
    assert not any(k.startswith("_teacher") or "teacher" in k for k in saved)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    runs = {}
    for name, batch, accum in [("big", 8, 1), ("accum", 4, 2)]:
        student, teacher = make_models(dropout=0.0)
        distiller = TinyKD(student, teacher)
        cfg = tiny_config(steps=10, batch_size=batch, grad_accum_steps=accum)
        train(distiller, TinyDataset(), cfg, tmp_path / name)
        runs[name] = (student_weights(distiller), history(tmp_path / name))
    (big, big_log), (accum, accum_log) = runs["big"], runs["accum"]
    assert len(accum_log) == 10
    for key in big:
        torch.testing.assert_close(accum[key], big[key], rtol=0, atol=1e-6)
    assert [r["loss"] for r in accum_log] == pytest.approx([r["loss"] for r in big_log], abs=1e-6)
    assert [r["lr"] for r in accum_log] == [r["lr"] for r in big_log]


def test_metrics_has_one_line_per_log_every_with_each_term(tmp_path):
    cfg = tiny_config(steps=10, log_every=3, warmup_steps=2, lr=0.01)
    result = train(TinyKD(*make_models()), TinyDataset(), cfg, tmp_path)
    records = history(tmp_path)
    assert [r["step"] for r in records] == [3, 6, 9, 10]  # and a last line at the end
    for record in records:
        assert set(record) == {"step", "loss", "kd", "ce", "diag/teacher_entropy", "lr", "elapsed_s",
                               "examples_per_s"}
        # the diagnostic is logged but not part of the optimised total
        assert record["loss"] == pytest.approx(record["kd"] + record["ce"], abs=1e-6)
        assert record["examples_per_s"] > 0
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    # lr is the one the logged step used: step 3 (index 2) is the first at the peak
    assert records[0]["lr"] == pytest.approx(0.01)
    assert result.history_path == tmp_path / "metrics.jsonl"
    assert result.final_losses == {k: records[-1][k] for k in ("loss", "kd", "ce", "diag/teacher_entropy")}
    # TensorBoard scalars are written when tensorboard is installed (the dev extra installs it)
    assert (tmp_path / "tb").is_dir() == (importlib.util.find_spec("tensorboard") is not None)


def test_checkpoint_rotation_keeps_the_last_n(tmp_path):
    cfg = tiny_config(steps=11, checkpoint_every=2, keep_checkpoints=3)
    train(TinyKD(*make_models()), TinyDataset(), cfg, tmp_path)
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_0000008", "step_0000010", "step_0000011"]  # + the final one
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [p.name for p in kept]  # no temp
    files = {p.name for p in kept[-1].iterdir()}
    assert files == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_0.pt", "state.json"}
    for name in ("optimizer.pt", "scheduler.pt", "rng_0.pt"):
        torch.load(kept[-1] / name, weights_only=True)
    state = json.loads((kept[-1] / "state.json").read_text())
    assert state["step"] == 11 and state["epoch"] == 1 and state["start"] == 3 * 8  # 64 samples = 8 batches


def test_resume_without_checkpoint_starts_fresh_with_a_log_line(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kdkit"):
        result = train(TinyKD(*make_models()), TinyDataset(), tiny_config(steps=3), tmp_path, resume=True)
    assert "no checkpoint" in caplog.text and "starting fresh" in caplog.text
    # the CLI's log format adds "kdkit: "; messages carrying it too printed "kdkit: kdkit: ..."
    assert not any(r.getMessage().startswith("kdkit:") for r in caplog.records)
    assert result.resumed_from is None and result.steps == 3
    assert [r["step"] for r in history(tmp_path)] == [1, 2, 3]


def test_fresh_start_refuses_a_folder_with_checkpoints(tmp_path):
    train(TinyKD(*make_models()), TinyDataset(), tiny_config(steps=2), tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(TinyKD(*make_models()), TinyDataset(), tiny_config(steps=2), tmp_path)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    """In-process version of the SIGKILL test: crash at step 8, resume from the step-5 checkpoint."""
    cfg = tiny_config(steps=12, checkpoint_every=5, log_every=2)
    reference = TinyKD(*make_models())
    train(reference, TinyDataset(), cfg, tmp_path / "reference")

    crashed = TinyKD(*make_models(), fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, TinyDataset(), cfg, tmp_path / "run")
    assert [r["step"] for r in history(tmp_path / "run")] == [2, 4, 6]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000005" / "state.json"
    crashed_elapsed = json.loads(checkpoint.read_text())["elapsed_s"]

    torch.manual_seed(123)  # a different global RNG state must not matter: the checkpoint restores it
    resumed = TinyKD(*make_models())
    result = train(resumed, TinyDataset(), cfg, tmp_path / "run", resume=True)

    assert result.resumed_from == 5 and result.steps == 12 and resumed.calls == 7
    # the training time counts the crashed session's steps too (train.json reports it)
    assert result.train_time_s > crashed_elapsed > 0
    assert result.train_time_s >= history(tmp_path / "run")[-1]["elapsed_s"] - 1e-3
    for key, value in student_weights(reference).items():
        assert torch.equal(student_weights(resumed)[key], value), key
    drop = ("elapsed_s", "examples_per_s")
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]  # noqa: E731
    assert strip(history(tmp_path / "run")) == strip(history(tmp_path / "reference"))


def test_resume_at_the_end_does_nothing(tmp_path):
    train(TinyKD(*make_models()), TinyDataset(), tiny_config(steps=4), tmp_path)
    again = TinyKD(*make_models())
    result = train(again, TinyDataset(), tiny_config(steps=4), tmp_path, resume=True)
    assert result.resumed_from == 4 and again.calls == 0
    assert result.final_losses["loss"] == history(tmp_path)[-1]["loss"]


def test_cross_entropy_distiller_learns(tmp_path):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = tiny_config(steps=60, lr=0.02, log_every=10, checkpoint_every=60)
    result = train(CrossEntropyDistiller(student), TinyDataset(), cfg, tmp_path)
    records = history(tmp_path)
    assert set(result.final_losses) == {"loss", "ce"}
    assert records[-1]["ce"] < 0.5 * records[0]["ce"]


class _DiagnosticsOnly(Distiller):
    def forward(self, batch):
        return {"_tokens": torch.tensor(3.0)}


def test_a_distiller_returning_only_diagnostics_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no loss term"):
        train(_DiagnosticsOnly(nn.Linear(8, 4), None), TinyDataset(), tiny_config(steps=1), tmp_path)


def test_dataset_smaller_than_a_batch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(TinyKD(*make_models()), TinyDataset(size=5), tiny_config(steps=1), tmp_path)


def test_bf16_on_cpu_trains_and_leaves_the_callers_forward_unpatched(tmp_path):
    distiller = TinyKD(*make_models())
    result = train(distiller, TinyDataset(), tiny_config(steps=3, mixed_precision="bf16"), tmp_path)
    assert result.steps == 3 and "forward" not in distiller.__dict__
    assert all(p.dtype == torch.float32 for p in distiller.parameters())
    with torch.no_grad():
        losses = distiller(TinyDataset()[0:4])  # a slice of the dataset is a batch
    assert losses["kd"].dtype == torch.float32  # no autocast left behind


def test_auto_precision_is_off_without_cuda():
    from kdkit.engine.trainer import resolve_mixed_precision

    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    assert resolve_mixed_precision("auto") == expected
    assert resolve_mixed_precision("fp16") == "fp16"
