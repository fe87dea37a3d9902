"""The one run skeleton every kind of run shares: for each student, build → train or resume →
save; then evaluate everything and write the report. A small adapter per kind says how.

Run folder: `output_dir/name/<UTC stamp>/` with config.json (what `kdkit eval` reads; its `kind`
picks the evaluator), config.yaml, students/<name>/ (engine output: metrics.jsonl, checkpoints
while training; train.json; the saved model), metrics.json, report.md, report.html, plots/.
`--resume` reuses the latest folder, skips finished students and continues unfinished ones from
their last checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn

from kdkit.engine.checkpoint import latest_checkpoint
from kdkit.pipelines.run_folder import resolve_run_dir

Log = Callable[[str], None]


class RunAdapter(Protocol):
    """What differs between kinds of run (classifier, LM, …)."""

    train_set: Any
    collate: Callable[[list[Any]], Any] | None
    delete_checkpoints: bool  # once the student's model is saved (LM checkpoints are large)

    def prepare(self, run_dir: Path) -> None:
        """Load or train the teacher, load the data, build the initial student."""

    def finished(self, out: Path) -> bool:
        """Whether the student whose folder is `out` was trained and saved."""

    def build_distiller(self, student_cfg: Any) -> nn.Module:
        """The student's distiller, from the same initial weights as every other student."""

    def describe(self, student_cfg: Any) -> str:
        """One line saying what this student minimises."""

    def save_student(self, distiller: nn.Module, student_cfg: Any, out: Path) -> None:
        """Write the trained student where `finished` and the evaluator look for it."""

    def evaluate(self, run_dir: Path) -> Path:
        """Evaluate the teacher and every finished student; write the report."""

    # Optional: `train_student(student_cfg, out, *, resume) -> dict` trains and saves the student
    # its own way (e.g. a text method's stages) instead of one engine run of `build_distiller`;
    # the dict (with "wall_time_s") is written to out/train.json.


def write_config(run_dir: Path, cfg: Any) -> None:
    data = cfg.model_dump(mode="json")
    (run_dir / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def run_students(
    cfg: Any,
    adapter: RunAdapter,
    *,
    resume: bool = False,
    run_dir: str | Path | None = None,
    log: Log = print,
) -> Path:
    """Prepare, train every student of `cfg.students` on `cfg.train`'s budget, evaluate, report.

    Every student starts from the same seed (same initial weights, data order and sampling
    stream), so the methods differ only in what they minimise. Returns the run folder.
    """
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    run_dir = resolve_run_dir(cfg.output_dir, cfg.name, resume=resume, run_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    log(f"kdkit: run folder {run_dir}")
    adapter.prepare(run_dir)
    for student_cfg in cfg.students:
        out = run_dir / "students" / student_cfg.name
        if adapter.finished(out):
            log(f"kdkit: student {student_cfg.name} already finished; skipping")
            continue
        out.mkdir(parents=True, exist_ok=True)
        log(f"kdkit: training student {student_cfg.name}: {adapter.describe(student_cfg)}")
        own = getattr(adapter, "train_student", None)
        if own is not None:
            info = own(student_cfg, out, resume=resume)
        else:
            info = _train_with_engine(cfg, adapter, student_cfg, out, resume=resume)
        (out / "train.json").write_text(json.dumps(info, indent=2) + "\n")
        if adapter.delete_checkpoints:  # the engine's, and those of a method's stages
            import shutil

            for folder in [out / "checkpoints", *out.glob("*/checkpoints")]:
                shutil.rmtree(folder, ignore_errors=True)
        log(f"kdkit: student {student_cfg.name} trained in {info['wall_time_s']:.0f} s")
    return adapter.evaluate(run_dir)


def _train_with_engine(cfg: Any, adapter: RunAdapter, student_cfg: Any, out: Path, *, resume: bool) -> dict:
    """One engine run of the student's distiller (DP-SGD where `cfg.privacy`); saves the student.
    Returns train.json's content."""
    from kdkit.engine import train

    torch.manual_seed(cfg.train.seed)
    distiller = adapter.build_distiller(student_cfg)
    privacy = getattr(cfg, "privacy", None)
    trainer: Any = train
    if privacy is not None:  # the engine's DP-SGD mode (kdkit.engine.private)
        from kdkit.engine.private import train_private

        def trainer(distiller: Any, dataset: Any, train_cfg: Any, folder: Path, *,
                    _privacy: Any = privacy, **kw: Any) -> Any:
            return train_private(distiller, dataset, train_cfg, _privacy, folder, **kw)
    result = trainer(
        distiller,
        adapter.train_set,
        cfg.train,
        out,
        collate_fn=adapter.collate,
        resume=resume and latest_checkpoint(out) is not None,
        description=f"student {student_cfg.name}",
    )
    adapter.save_student(distiller, student_cfg, out)
    params = student_cfg.method_params()
    info = {
        "method": student_cfg.method,
        "params": None if params is None else params.model_dump(mode="json"),
        "steps": result.steps,
        "wall_time_s": result.train_time_s,  # every session's training time, resumed ones too
        "final_losses": result.final_losses,
        "resumed_from": result.resumed_from,
    }
    if privacy is not None:  # the full statement is in out/privacy.json
        info["privacy"] = {"epsilon": result.epsilon, **result.plan.to_dict()}
    return info


__all__ = ["RunAdapter", "run_students", "write_config"]
