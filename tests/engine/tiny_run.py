"""A tiny KD run for the engine tests: a dropout MLP student learns from a frozen MLP teacher.

Imported by the unit tests, and run as a script by the kill/resume and multi-process tests:

    python tests/engine/tiny_run.py RUN_DIR [--steps 40] [--resume] [--delay 0.05] ...
    accelerate launch --multi_gpu --num_processes 2 tests/engine/tiny_run.py RUN_DIR --batch-size 4

The script writes RUN_DIR/final.safetensors (student weights), RUN_DIR/facts_{rank}.json (what
each process saw of the teacher) and prints the TrainResult as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from kdkit.config import TrainConfig
from kdkit.engine import Distiller, train

FEATURES, CLASSES = 8, 4


class TinyDataset(Dataset):
    """`size` fixed random points labelled by a fixed random linear rule (same on every process)."""

    def __init__(self, size: int = 64) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.inputs = torch.randn(size, FEATURES, generator=generator)
        self.labels = (self.inputs @ torch.randn(FEATURES, CLASSES, generator=generator)).argmax(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[index], "labels": self.labels[index]}


def make_models(dropout: float = 0.2) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) with fixed initial weights, independent of the global RNG's state."""
    state = torch.get_rng_state()
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    student = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, CLASSES))
    torch.set_rng_state(state)
    return student, teacher


class TinyKD(Distiller):
    """Hinton KD at temperature 2 plus cross-entropy, with one "_" diagnostic term.

    Records what it sees of the teacher on every call, and can sleep (`delay` seconds) so a test
    has time to kill it mid-run, or raise after `fail_after` calls to simulate a crash.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, delay: float = 0.0,
                 fail_after: int | None = None) -> None:
        super().__init__(student, teacher)
        self.delay = delay
        self.fail_after = fail_after
        self.calls = 0
        self.teacher_seen_training = False
        self.teacher_seen_requires_grad = False

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        teacher = self.teacher
        self.teacher_seen_training |= teacher.training
        self.teacher_seen_requires_grad |= any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            teacher_logits = teacher(batch["inputs"])
        student_logits = self.student(batch["inputs"])
        temperature = 2.0
        kd = F.kl_div(
            F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
            log_target=True, reduction="batchmean",
        ) * temperature**2
        ce = F.cross_entropy(student_logits, batch["labels"])
        if self.delay:
            time.sleep(self.delay)
        teacher_entropy = -(teacher_logits.softmax(-1) * teacher_logits.log_softmax(-1)).sum(-1).mean()
        return {"kd": 0.7 * kd, "ce": 0.3 * ce, "_teacher_entropy": teacher_entropy.detach()}


def tiny_config(**overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        steps=20, batch_size=8, lr=0.01, warmup_steps=2, checkpoint_every=5, keep_checkpoints=2,
        log_every=1, progress=False, mixed_precision="no", seed=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--fail-after", type=int, default=None, help="crash on forward call N+1")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the test machine is shared; also keeps CPU reductions identical
    student, teacher = make_models(args.dropout)
    distiller = TinyKD(student, teacher, delay=args.delay, fail_after=args.fail_after)
    cfg = tiny_config(
        steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every,
    )
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    result = train(distiller, TinyDataset(), cfg, args.run_dir, resume=args.resume)

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    facts = {
        "world_size": torch.distributed.get_world_size() if distributed else 1,
        "teacher_is_ddp": isinstance(distiller.teacher, nn.parallel.DistributedDataParallel),
        "teacher_is_submodule": any(m is distiller.teacher for m in distiller.modules()),
        "teacher_seen_training": distiller.teacher_seen_training,
        "teacher_seen_requires_grad": distiller.teacher_seen_requires_grad,
        "teacher_requires_grad": any(p.requires_grad for p in distiller.teacher.parameters()),
        "teacher_grads": any(p.grad is not None for p in distiller.teacher.parameters()),
        "teacher_unchanged": all(map(torch.equal, teacher_before, distiller.teacher.parameters())),
        "forward_calls": distiller.calls,
    }
    (args.run_dir / f"facts_{rank}.json").write_text(json.dumps(facts))
    if rank == 0:
        weights = {k: v.detach().cpu().contiguous() for k, v in distiller.student.state_dict().items()}
        save_file(weights, str(args.run_dir / "final.safetensors"))
        print(json.dumps({"steps": result.steps, "resumed_from": result.resumed_from,
                          "final_losses": result.final_losses}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
