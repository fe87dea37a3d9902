"""A run killed with SIGKILL mid-training resumes to exactly the weights of an uninterrupted run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from kdkit.engine.checkpoint import latest_checkpoint, list_checkpoints
from tests.engine import tiny_run

SCRIPT = Path(tiny_run.__file__)
# dropout 0.2 in the student, so the resumed run only matches if the RNG state is restored too
ARGS = ["--steps", "40", "--checkpoint-every", "5", "--log-every", "1", "--dropout", "0.2"]


def history_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return steps


def timeless(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "examples_per_s")} for r in records]


def kill_after_first_checkpoint(run_dir: Path, timeout_s: float = 120.0) -> tuple[int, int]:
    """Start the slowed-down run, SIGKILL it once a checkpoint exists and it has logged a step past
    that checkpoint. Returns (last logged step, latest checkpoint step) at the kill."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    victim = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(run_dir), *ARGS, "--delay", "0.05"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if victim.poll() is not None:
                raise AssertionError(f"the run ended before it was killed:\n{victim.stderr.read().decode()}")
            checkpoint = latest_checkpoint(run_dir)
            if checkpoint is not None and max(history_steps(run_dir), default=0) > int(checkpoint.name[5:]):
                break
            time.sleep(0.005)
        else:
            raise AssertionError("no checkpoint appeared in time")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    return max(history_steps(run_dir)), int(latest_checkpoint(run_dir).name[5:])


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, capsys):
    tiny_run.main([str(tmp_path / "reference"), *ARGS])

    killed_at, checkpoint_step = kill_after_first_checkpoint(tmp_path / "run")
    assert 0 < checkpoint_step < killed_at < 40
    for checkpoint in list_checkpoints(tmp_path / "run"):  # whatever the kill interrupted, these are whole
        assert {p.name for p in checkpoint.iterdir()} >= {"model.safetensors", "optimizer.pt", "state.json"}

    capsys.readouterr()
    tiny_run.main([str(tmp_path / "run"), *ARGS, "--resume"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["resumed_from"] == checkpoint_step and printed["steps"] == 40

    expected = load_file(tmp_path / "reference" / "final.safetensors")
    got = load_file(tmp_path / "run" / "final.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # the history was cut back to the checkpoint and continued: no duplicates, same values
    assert history_steps(tmp_path / "run") == list(range(1, 41))
    assert timeless(tmp_path / "run") == timeless(tmp_path / "reference")
