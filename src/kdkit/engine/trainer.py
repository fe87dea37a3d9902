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
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    GradientAccumulationPlugin,
    gather_object,
    set_seed,
)
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kdkit.engine import checkpoint
from kdkit.engine.data import DataPosition, EpochSampler, build_loader, endless_batches
from kdkit.engine.distiller import Distiller
from kdkit.engine.metrics import LossWindow, MetricsWriter, merge_windows, total_loss, truncate_history
from kdkit.engine.phases import phase, synchronize
from kdkit.engine.schedule import build_optimizer, build_scheduler
from kdkit.engine.settings import TrainConfig
from kdkit.settings import ConfigError

logger = logging.getLogger(__name__)

# History fields that describe the run rather than a loss term.
RUN_FIELDS = ("step", "lr", "elapsed_s", "examples_per_s")
# The diagnostic a distiller returns to get token-weighted accumulation (see TokenWeighting).
TOKENS = "_tokens"


@dataclass
class TrainResult:
    """What `train` hands back. final_losses: the last logged window's averaged terms (nats, etc.).

    wall_time_s: this call's wall time (set-up included); train_time_s: training time over every
    session of the run, earlier (killed, resumed) ones included, up to the last step.
    """

    steps: int
    final_losses: dict[str, float]
    history_path: Path
    wall_time_s: float
    resumed_from: int | None
    train_time_s: float = 0.0


@dataclass
class _Progress:
    """Everything a checkpoint must remember besides the weights and optimizer."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    elapsed_s: float = 0.0  # training time of earlier (killed) sessions of this run
    window: LossWindow = field(default_factory=LossWindow)
    # token mode: c in the n_i / c weight of each micro-batch's loss (see TokenWeighting); a typical
    # micro-batch's token count, so backpropagated values keep the size of a mean
    token_scale: float | None = None


class TokenWeighting:
    """Weighs micro-batches by their token counts when the distiller reports `_tokens`.

    A distiller's terms are means over the tokens of one micro-batch (n_i of them). Averaging those
    means over micro-batches and processes would make a token of a short completion weigh more than
    one of a long completion. Instead, each micro-batch's loss L_i is backpropagated as L_i·n_i/c
    (c: `token_scale`, one number for the whole run and every process), and once the step's
    micro-batches are done the gradient is multiplied by c·A·W/N, where N = Σ n_i over every
    micro-batch of every process (one all-reduce), A = grad_accum_steps (Accelerate's `backward`
    divides by it) and W = processes (DDP averages over them). The result is Σ_i n_i·∇L_i / N:
    the gradient of the mean over every token trained on in the optimizer step, whatever the
    split into micro-batches and processes. Distillers without `_tokens` keep the plain average
    (micro-batches of equal size, so examples weigh alike).
    """

    def __init__(self, accelerator: Accelerator, grad_accum_steps: int) -> None:
        self.accelerator = accelerator
        self.grad_accum_steps = grad_accum_steps
        # DeepSpeed keeps gradients in its own partitions, where they cannot be rescaled here
        self.enabled = accelerator.distributed_type != DistributedType.DEEPSPEED
        self._warned = False
        self._invalid: torch.Tensor | None = None  # GPU counts not yet checked (see `verify`)

    def count(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The micro-batch's token count (a 0-dim tensor), or None when the distiller reports none
        (or under DeepSpeed). A count on a CPU is checked at once; one on a GPU stays there (reading
        it would make the loop wait for the forward pass) and is checked by the next `verify`."""
        if TOKENS not in losses:
            return None
        if not self.enabled:
            if not self._warned:
                logger.warning("under DeepSpeed micro-batches weigh alike, not by their `_tokens`")
                self._warned = True
            return None
        tokens = torch.as_tensor(losses[TOKENS]).detach()
        if tokens.device.type == "cpu":
            self._refuse(float(tokens))
        else:
            invalid = ~(tokens >= 0)  # negative or NaN
            self._invalid = invalid if self._invalid is None else self._invalid | invalid
        return tokens

    def verify(self) -> None:
        """Raise if a count handed to `count` on a GPU since the last call was not a count ≥ 0."""
        invalid, self._invalid = self._invalid, None
        if invalid is not None and bool(invalid):
            self._refuse(float("nan"))

    @staticmethod
    def _refuse(tokens: float) -> None:
        if not tokens >= 0:
            raise ValueError(f"the distiller's `_tokens` must be a count ≥ 0, got {tokens}")

    @staticmethod
    def check(counts: list[torch.Tensor | None]) -> None:
        """Refuse a distiller that reports `_tokens` for some micro-batches of a step but not others."""
        if (counts[0] is None) != (counts[-1] is None):
            raise ValueError(
                "the distiller returned `_tokens` for some micro-batches and not for others; return it "
                "always (token-weighted accumulation) or never (micro-batches weigh alike)"
            )

    def weight(self, state: _Progress, tokens: torch.Tensor) -> torch.Tensor:
        """n_i / c for this micro-batch; c is fixed on the run's first token-reporting micro-batch as
        the mean of that micro-batch's counts over the processes (every process reaches it together;
        the one point where the loop waits for a count on a GPU)."""
        if state.token_scale is None:
            first = float(self._sum_over_processes(tokens))
            state.token_scale = max(first / self.accelerator.num_processes, 1.0)
        return tokens / state.token_scale

    def normalise(self, model: nn.Module, state: _Progress, step_tokens: torch.Tensor) -> None:
        """Multiply the synchronised gradients by c·A·W/N (N: tokens of the step, all processes),
        without reading N on the host."""
        total = self._sum_over_processes(step_tokens)
        assert state.token_scale is not None
        # N = 0: no token anywhere, every micro-batch contributed n_i·L_i = 0; leave the zeros
        scale = state.token_scale * self.grad_accum_steps * self.accelerator.num_processes
        factor = torch.where(total > 0, scale / total.clamp(min=1e-30), torch.zeros_like(total))
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device))

    def _sum_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """Σ of `value` over the processes (one all-reduce; with one process, `value` itself)."""
        if self.accelerator.num_processes == 1:
            return value
        device = self.accelerator.device
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        count = value.detach().to(device=device, dtype=dtype).reshape(1)
        return self.accelerator.reduce(count, reduction="sum").reshape(())


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
    accelerator = Accelerator(
        cpu=not _has_accelerator_device(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_plugin=plugin,
        # batches from pinned memory are copied to a GPU without waiting for it (no-op on a CPU)
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        logger.warning("fp16 on %s: Accelerate neither autocasts nor scales the loss there, so "
                       "this run trains in float32 (bf16 is the mixed precision CPUs support)",
                       accelerator.device.type)
    return accelerator


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
            collate_fn=collate_fn, pin_memory=accelerator.device.type == "cuda",
        )
        # the fused AdamW step where torch has it for the device the model will train on, and no
        # fp16 loss scaler (a fused step skips inf/NaN steps inside the kernel, where Accelerate
        # cannot see the skip that must hold the lr schedule back)
        fused = accelerator.device.type in ("cpu", "cuda") and accelerator.scaler is None
        optimizer = build_optimizer(distiller, cfg, fused=fused)
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
        weighting = TokenWeighting(accelerator, cfg.grad_accum_steps)
        batches = endless_batches(
            loader, sampler, state.position, samples_per_batch=samples_per_batch,
            samples_per_epoch=samples_per_epoch,
        )
        last_record: dict[str, Any] | None = None
        try:
            model.train()
            if rng is not None:  # last, so nothing above shifts the restored random streams
                checkpoint.restore_rng(rng)
            session_start = window_start = shown_at = time.perf_counter()
            while state.step < cfg.steps:
                lr = optimizer.param_groups[0]["lr"]
                distiller.on_step(state.step)  # before its micro-batches: schedules count optimizer steps
                counts: list[torch.Tensor | None] = []
                for _ in range(cfg.grad_accum_steps):
                    with phase("data"):
                        batch = next(batches)
                    with accelerator.accumulate(model):  # DDP all-reduces only on the last micro-batch
                        losses = model(batch)
                        total = total_loss(losses)  # "_" diagnostics excluded
                        tokens = weighting.count(losses)
                        counts.append(tokens)
                        weighting.check(counts)
                        weight = 1.0 if tokens is None else weighting.weight(state, tokens)  # n_i / c
                        with phase("backward"):
                            accelerator.backward(total * weight)  # Accelerate then divides by grad_accum
                    shown = state.window.add(losses, total, _batch_examples(batch), weight=tokens)
                assert accelerator.sync_gradients, "gradient accumulation fell out of step with the engine"
                with phase("optimizer"):
                    if counts[0] is not None:
                        weighting.normalise(model, state, sum(counts))  # / tokens of the whole step
                    if cfg.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update, lr stays
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.step += 1

                bar.update(1)
                # Nothing above waits for the GPU (values stay there until read); the loop does at a
                # log line, and for the progress bar's loss at most once a second.
                logs = state.step % cfg.log_every == 0 or state.step == cfg.steps
                if logs:
                    weighting.verify()
                    synchronize(accelerator.device)  # the time stamp then covers the GPU's work
                now = time.perf_counter()
                if not bar.disable and (logs or now - shown_at >= 1.0):
                    terms = {k: f"{float(v):.4g}" for k, v in shown.items() if not k.startswith("diag/")}
                    bar.set_postfix(terms, refresh=False)
                    shown_at = now
                if logs:
                    last_record = _log(accelerator, metrics, state, lr,
                                       state.elapsed_s + now - session_start, now - window_start)
                    window_start = now
                if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
                    _save(accelerator, run_dir, cfg, distiller, optimizer, scheduler, state,
                          samples_per_batch, state.elapsed_s + time.perf_counter() - session_start)
        finally:
            bar.close()
            metrics.close()
        session_s = time.perf_counter() - session_start
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
        train_time_s=state.elapsed_s + session_s,
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
        logger.warning("resume requested but %s has no checkpoint; starting fresh", run_dir)
        if accelerator.is_main_process:
            truncate_history(run_dir / "metrics.jsonl", 0)
        return _Progress(), None, None

    rank = accelerator.process_index
    saved, rng = checkpoint.load_checkpoint(latest, distiller, optimizer, scheduler, rank)
    _restore_scaler(accelerator, latest)
    if saved["samples_per_batch"] != samples_per_batch or saved["num_processes"] != accelerator.num_processes:
        logger.warning(
            "resuming with %d processes × batch %d, the checkpoint used %d samples per micro-batch "
            "over %d processes; the run continues but will not match an uninterrupted one exactly",
            accelerator.num_processes, samples_per_batch // accelerator.num_processes,
            saved["samples_per_batch"], saved["num_processes"],
        )
    if rng is None:
        logger.warning("%s has no RNG state for process %d", latest, accelerator.process_index)
    if accelerator.is_main_process:
        truncate_history(run_dir / "metrics.jsonl", saved["step"])
    accelerator.wait_for_everyone()
    logger.info("resuming from %s", latest)
    progress = _Progress(
        step=saved["step"],
        position=DataPosition(saved["epoch"], saved["start"]),
        elapsed_s=saved["elapsed_s"],
        window=LossWindow.from_dict(saved["window"]),
        token_scale=saved.get("token_scale"),
    )
    return progress, rng, saved["step"]


def _restore_scaler(accelerator: Accelerator, folder: Path) -> None:
    """Every process loads the fp16 loss scale and growth tracker the checkpoint saved, so the
    resumed run skips and rescales exactly where the uninterrupted one would."""
    state = checkpoint.read_scaler_state(folder)
    scaler = accelerator.scaler
    if scaler is not None and state:
        scaler.load_state_dict(state)
    elif scaler is not None:
        logger.warning("%s has no loss-scaler state (not an fp16 run); the loss scale starts "
                       "afresh at %g", folder, scaler.get_scale())
    elif state:
        logger.warning("%s was written by an fp16 run with loss scaling; this run has no "
                       "loss scaler, so the saved scale is ignored", folder)


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
            "token_scale": state.token_scale,
        }
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        checkpoint.write_main_files(temp, distiller, optimizer, scheduler, saved, scaler_state=scaler)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoint.publish(temp, checkpoint.checkpoint_dir(run_dir, state.step), cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
