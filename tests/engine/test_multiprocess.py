"""Two CPU processes under `accelerate launch` (gloo DDP) reach the weights of one process with the
same global batch, and never wrap, train or unfreeze the teacher."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.engine import tiny_run

SCRIPT = Path(tiny_run.__file__)
# no dropout: two processes draw masks from two RNG streams, one process from one
ARGS = ["--steps", "12", "--checkpoint-every", "6", "--log-every", "3", "--dropout", "0"]


def free_port() -> int:
    with socket.socket() as sock:  # a fixed 29500 would collide with other runs on this machine
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command() -> list[str]:
    launcher = Path(sys.executable).with_name("accelerate")
    return [str(launcher)] if launcher.exists() else [shutil.which("accelerate") or "accelerate"]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    tiny_run.main([str(tmp_path / "one"), *ARGS, "--batch-size", "8"])

    # --multi_gpu selects the torchrun launcher; on a machine without GPUs the engine asks
    # Accelerate for cpu=True, which makes the processes join a gloo group
    command = [
        *accelerate_command(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(SCRIPT), str(tmp_path / "two"), *ARGS, "--batch-size", "4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    for rank in (0, 1):
        facts = json.loads((tmp_path / "two" / f"facts_{rank}.json").read_text())
        assert facts["world_size"] == 2
        assert facts["teacher_is_ddp"] is False and facts["teacher_is_submodule"] is False
        assert facts["teacher_seen_training"] is False and facts["teacher_seen_requires_grad"] is False
        assert facts["teacher_requires_grad"] is False and facts["teacher_grads"] is False
        assert facts["teacher_unchanged"] is True and facts["forward_calls"] == 12

    one = load_file(tmp_path / "one" / "final.safetensors")
    two = load_file(tmp_path / "two" / "final.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    # logged terms are averaged over both processes, so the histories agree too
    histories = [
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    assert [r["step"] for r in histories[1]] == [3, 6, 9, 12]
    for a, b in zip(*histories):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["lr"] == pytest.approx(a["lr"])
    checkpoint = tmp_path / "two" / "checkpoints" / "step_0000012"
    assert {"rng_0.pt", "rng_1.pt"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.slow
def test_two_processes_weigh_tokens_like_one_bigger_batch(tmp_path):
    """Completions of 1-2 and 16-20 tokens: 2 processes × 16 (token counts all-reduced) step to the
    weights of 1 process × 32, and log the same token-weighted losses."""
    from tests.engine import tiny_lm

    tiny_lm.main([str(tmp_path / "one"), "--batch-size", "32"])
    command = [
        *accelerate_command(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(Path(tiny_lm.__file__)), str(tmp_path / "two"), "--batch-size", "16",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "one" / "final.safetensors")
    two = load_file(tmp_path / "two" / "final.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)
    histories = [
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    assert [r["step"] for r in histories[1]] == [1, 2]
    for a, b in zip(*histories, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
