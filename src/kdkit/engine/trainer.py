"""The training loop: one Accelerate loop for every method, with checkpoints, resume and logging."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin, gather_object, set_seed
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kdkit.engine import checkpoint
from kdkit.engine.data import DataPosition, EpochSampler, build_loader, endless_batches
from kdkit.engine.distiller import Distiller
from kdkit.engine.metrics import LossWindow, MetricsWriter, merge_windows, total_loss, truncate_history
from kdkit.engine.schedule import build_optimizer, build_scheduler
from kdkit.engine.settings import TrainConfig
from kdkit.settings import ConfigError

logger = logging.getLogger(__name__)

# History fields that describe the run rather than a loss term.
RUN_FIELDS = ("step", "lr", "elapsed_s", "examples_per_s")


@dataclass
class TrainResult:
    """What `train` hands back. final_losses: the last logged window's averaged terms (nats, etc.)."""

    steps: int
    final_losses: dict[str, float]
    history_path: Path
    wall_time_s: float
    resumed_from: int | None


@dataclass
class _Progress:
    """Everything a checkpoint must remember besides the weights and optimizer."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    elapsed_s: float = 0.0  # training time of earlier (killed) sessions of this run
    window: LossWindow = field(default_factory=LossWindow)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers (the object that was trained)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def resolve_mixed_precision(setting: str) -> str:
    """"auto" -> "bf16" on a CUDA device that supports it, else "no"; other values unchanged."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _has_accelerator_device() -> bool:
    accel = getattr(torch, "accelerator", None)
    if accel is not None and hasattr(accel, "is_available"):
        return bool(accel.is_available())
    return torch.cuda.is_available()


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for one run; works unchanged on a CPU, one GPU or under `accelerate launch`."""
    # Accelerate keeps its state in process-wide singletons; clear what an earlier run configured
    # (the process group survives) so each call gets its own precision and accumulation settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = GradientAccumulationPlugin(num_steps=cfg.grad_accum_steps, sync_with_dataloader=False)
    # cpu=True on a machine without GPUs makes `accelerate launch --num_processes N` use gloo DDP
    return Accelerator(
        cpu=not _has_accelerator_device(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_plugin=plugin,
    )


@contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels on GPUs (warning, not failing, where none exists), restored afterwards.

    CPU kernels are already deterministic for a fixed thread count, and the switch costs ~4 s of
    importing torch's compiler stack on first use, so it is only flipped for other devices.
    """
    if not enabled or device.type == "cpu":
        yield
        return
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def _batch_examples(batch: Any) -> int:
    """Examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for value in values:
        count = _batch_examples(value)
        if count:
            return count
    return 0


def _last_record(history: Path) -> dict[str, Any] | None:
    if not history.is_file():
        return None
    lines = [line for line in history.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def train(
    distiller: Distiller,
    dataset: Dataset,
    cfg: TrainConfig,
    run_dir: Path,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    resume: bool = False,
    description: str = "train",
) -> TrainResult:
    """Train `distiller` in place for `cfg.steps` optimizer steps; returns a summary.

    dataset: map-style, yields dict samples (collated into dicts of tensors). Each optimizer step
    uses `grad_accum_steps` micro-batches of `batch_size` per process. The history goes to
    run_dir/metrics.jsonl (+ run_dir/tb), checkpoints to run_dir/checkpoints/step_NNNNNNN.
    resume=True continues from the latest checkpoint with the same data order and RNG, so the
    result equals an uninterrupted run; without a checkpoint it logs that and starts fresh.
    After return `distiller` holds the trained weights (on the accelerator's device).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    history = run_dir / "metrics.jsonl"
    accelerator = make_accelerator(cfg)
    was_training = distiller.training
    with deterministic_algorithms(cfg.deterministic, accelerator.device):
        set_seed(cfg.seed, device_specific=True)  # distinct dropout streams per process
        samples_per_batch = cfg.batch_size * accelerator.num_processes
        samples_per_epoch = len(dataset) // samples_per_batch * samples_per_batch
        if samples_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {len(dataset)} samples, fewer than one batch of {cfg.batch_size} × "
                f"{accelerator.num_processes} processes"
            )
        sampler = EpochSampler(len(dataset), cfg.seed)
        loader = build_loader(
            dataset, sampler, batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers,
            collate_fn=collate_fn,
        )
        optimizer = build_optimizer(distiller, cfg)
        scheduler = build_scheduler(optimizer, cfg)  # not prepared: Accelerate would step it once per process
        model, optimizer, loader = accelerator.prepare(distiller, optimizer, loader)
        distiller.move_teacher(accelerator.device)

        state, rng, resumed_from = _start_or_resume(
            accelerator, run_dir, resume, distiller, optimizer, scheduler, samples_per_batch
        )
        metrics = MetricsWriter(run_dir, enabled=accelerator.is_main_process, purge_after=resumed_from)
        bar = tqdm(
            total=cfg.steps, initial=state.step, desc=description, dynamic_ncols=True,
            disable=not (cfg.progress and accelerator.is_local_main_process),
        )
        batches = endless_batches(
            loader, sampler, state.position, samples_per_batch=samples_per_batch,
            samples_per_epoch=samples_per_epoch,
        )
        last_record: dict[str, Any] | None = None
        try:
            model.train()
            if rng is not None:  # last, so nothing above shifts the restored random streams
                checkpoint.restore_rng(rng)
            session_start = window_start = time.perf_counter()
            while state.step < cfg.steps:
                lr = optimizer.param_groups[0]["lr"]
                for _ in range(cfg.grad_accum_steps):
                    batch = next(batches)
                    with accelerator.accumulate(model):  # DDP all-reduces only on the last micro-batch
                        losses = model(batch)
                        total = total_loss(losses)  # "_" diagnostics excluded
                        accelerator.backward(total)  # scaled by 1 / grad_accum_steps
                    shown = state.window.add(losses, total, _batch_examples(batch))
                assert accelerator.sync_gradients, "gradient accumulation fell out of step with the engine"
                if cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1

                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if not k.startswith("diag/")},
                                refresh=False)
                now = time.perf_counter()
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    last_record = _log(accelerator, metrics, state, lr,
                                       state.elapsed_s + now - session_start, now - window_start)
                    window_start = now
                if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                    _save(accelerator, run_dir, cfg, distiller, optimizer, scheduler, state,
                          samples_per_batch, state.elapsed_s + time.perf_counter() - session_start)
        finally:
            bar.close()
            metrics.close()
        accelerator.wait_for_everyone()
        # drops Accelerate's autocast wrapper from the caller's object; DDP never owned the weights
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        bound = distiller.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(distiller).forward:
            del distiller.forward  # the restored original, left as an instance attribute
        distiller.train(was_training)

    record = last_record or _last_record(history) or {}
    return TrainResult(
        steps=state.step,
        final_losses={k: float(v) for k, v in record.items() if k not in RUN_FIELDS},
        history_path=history,
        wall_time_s=time.perf_counter() - started,
        resumed_from=resumed_from,
    )


def _start_or_resume(
    accelerator: Accelerator,
    run_dir: Path,
    resume: bool,
    distiller: Distiller,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    samples_per_batch: int,
) -> tuple[_Progress, dict[str, Any] | None, int | None]:
    """Fresh progress, or the latest checkpoint loaded in place; returns (progress, rng, step)."""
    if accelerator.is_main_process:
        checkpoint.remove_leftovers(run_dir)
    accelerator.wait_for_everyone()
    latest = checkpoint.latest_checkpoint(run_dir)
    if not resume:
        if latest is not None:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints (latest: {latest.name}); pass resume=True (--resume) "
                "to continue that run, or choose an empty run folder"
            )
        if accelerator.is_main_process:
            truncate_history(run_dir / "metrics.jsonl", 0)
        return _Progress(), None, None
    if latest is None:
        logger.warning("kdkit: resume requested but %s has no checkpoint; starting fresh", run_dir)
        if accelerator.is_main_process:
            truncate_history(run_dir / "metrics.jsonl", 0)
        return _Progress(), None, None

    rank = accelerator.process_index
    saved, rng = checkpoint.load_checkpoint(latest, distiller, optimizer, scheduler, rank)
    if saved["samples_per_batch"] != samples_per_batch or saved["num_processes"] != accelerator.num_processes:
        logger.warning(
            "kdkit: resuming with %d processes × batch %d, the checkpoint used %d samples per micro-batch "
            "over %d processes; the run continues but will not match an uninterrupted one exactly",
            accelerator.num_processes, samples_per_batch // accelerator.num_processes,
            saved["samples_per_batch"], saved["num_processes"],
        )
    if rng is None:
        logger.warning("kdkit: %s has no RNG state for process %d", latest, accelerator.process_index)
    if accelerator.is_main_process:
        truncate_history(run_dir / "metrics.jsonl", saved["step"])
    accelerator.wait_for_everyone()
    logger.info("kdkit: resuming from %s", latest)
    progress = _Progress(
        step=saved["step"],
        position=DataPosition(saved["epoch"], saved["start"]),
        elapsed_s=saved["elapsed_s"],
        window=LossWindow.from_dict(saved["window"]),
    )
    return progress, rng, saved["step"]


def _log(
    accelerator: Accelerator, metrics: MetricsWriter, state: _Progress, lr: float, elapsed_s: float,
    window_s: float,
) -> dict[str, Any]:
    """Average the window over every process, write one history line, start a new window."""
    means, examples = merge_windows(gather_object([state.window.to_dict()]))
    record = {"step": state.step, **means, "lr": lr, "elapsed_s": round(elapsed_s, 3),
              "examples_per_s": round(examples / max(window_s, 1e-9), 2)}
    metrics.write(record)
    state.window = LossWindow()
    return record


def _save(
    accelerator: Accelerator,
    run_dir: Path,
    cfg: TrainConfig,
    distiller: Distiller,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: _Progress,
    samples_per_batch: int,
    elapsed_s: float,
) -> None:
    """Write step_N atomically: every process adds its RNG file to a temp folder, main renames it."""
    temp = checkpoint.temp_dir(run_dir, state.step)
    if accelerator.is_main_process:
        checkpoint.remove_leftovers(run_dir)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    checkpoint.write_rng(temp, accelerator.process_index)
    if accelerator.is_main_process:
        saved = {
            "step": state.step,
            "epoch": state.position.epoch,
            "start": state.position.start,
            "samples_per_batch": samples_per_batch,
            "num_processes": accelerator.num_processes,
            "elapsed_s": elapsed_s,
            "seed": cfg.seed,
            "window": state.window.to_dict(),
        }
        checkpoint.write_main_files(temp, distiller, optimizer, scheduler, saved)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.publish(temp, checkpoint.checkpoint_dir(run_dir, state.step), cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
