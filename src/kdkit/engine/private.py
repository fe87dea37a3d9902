"""The DP-SGD mode of the engine: Poisson sampling, per-example clipping and Gaussian noise (Opacus).

`train_private(distiller, dataset, cfg, privacy, run_dir)` trains the distiller's trainable
parameters (the student, never the teacher, which `Distiller` keeps outside the module tree) with
DP-SGD and accounts the privacy spent:

- each step's batch is drawn by Poisson sampling: every record joins independently with
  probability q (`opacus.utils.uniform_sampler.UniformWithReplacementSampler`), so batch sizes vary
  and may be 0 (such a step still adds noise and is counted);
- per-example gradients come from `opacus.GradSampleModule` (hooks for Linear / Embedding /
  LayerNorm / RMSNorm, functorch for layers without a hook, e.g. Hugging Face's LlamaRMSNorm);
- `opacus.optimizers.DPOptimizer` clips each example's gradient to norm C, sums, adds
  N(0, σ²C²) noise and divides by the expected batch size q·N;
- an Opacus accountant ("rdp" or "prv") records every step; ε at δ is logged with the losses
  (metrics.jsonl: "privacy/epsilon") and returned, and run_dir/privacy.json states what it covers.

The distiller must return losses that are a *mean over examples of per-example losses* (each
example's loss depending on that example alone): `GradSampleModule(loss_reduction="mean")` then
recovers each example's own gradient. `kdkit.methods.private_distiller.PrivateLMDistiller` does this for LMs.
The trainer's own loop (`kdkit.engine.trainer.train`) is not used: DP-SGD needs its own batches
(Poisson, not shuffled epochs) and its own optimizer step; checkpoints, metrics and the resume
logic are the engine's (`checkpoint`, `metrics`). One process, one device (CUDA if present).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from kdkit.engine import checkpoint
from kdkit.engine.distiller import Distiller
from kdkit.engine.metrics import LossWindow, MetricsWriter, merge_windows, total_loss, truncate_history
from kdkit.engine.privacy_settings import PrivacyConfig
from kdkit.engine.schedule import build_optimizer, build_scheduler
from kdkit.engine.settings import TrainConfig
from kdkit.privacy.accounting import accountant_epsilon, noise_for_epsilon
from kdkit.privacy.statement import privacy_statement
from kdkit.settings import ConfigError

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved DP-SGD parameters of one run (all numbers; see `PrivacyConfig`)."""

    records: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    steps: int
    accountant: str
    planned_epsilon: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan_privacy(privacy: PrivacyConfig, records: int, cfg: TrainConfig) -> PrivacyPlan:
    """Resolve q, δ and σ for `records` private records and `cfg.steps` steps (no training)."""
    if records <= 0:
        raise ConfigError("the private dataset is empty")
    sample_rate = privacy.sample_rate if privacy.sample_rate is not None else cfg.batch_size / records
    if sample_rate > 1.0:
        raise ConfigError(
            f"config error at train.batch_size: the expected batch ({cfg.batch_size}) exceeds the "
            f"{records} private records; lower batch_size or set privacy.sample_rate"
        )
    delta = privacy.delta if privacy.delta is not None else 1.0 / records
    if delta > 1.0 / records:
        raise ConfigError(
            f"config error at privacy.delta: {delta:g} is above 1/N = {1.0 / records:g}; such a δ "
            "permits releasing a record outright with probability δ. Use δ ≤ 1/N"
        )
    if privacy.target_epsilon is not None:
        sigma = noise_for_epsilon(privacy.target_epsilon, delta, sample_rate, cfg.steps, privacy.accountant)
    else:
        sigma = float(privacy.noise_multiplier)
    planned = accountant_epsilon([(sigma, sample_rate, cfg.steps)], delta, privacy.accountant)
    return PrivacyPlan(records, sample_rate, sigma, privacy.max_grad_norm, delta, cfg.steps,
                      privacy.accountant, planned)


@dataclass
class PrivateTrainResult:
    """What `train_private` hands back: the TrainResult fields plus the privacy spent.
    train_time_s: training time over every session of the run (resumed ones too)."""

    steps: int
    final_losses: dict[str, float]
    history_path: Path
    wall_time_s: float
    resumed_from: int | None
    epsilon: float
    plan: PrivacyPlan
    mean_batch_size: float
    train_time_s: float = 0.0


# ---------------------------------------------------------------------------------------- checks


class UnsupportedLayerError(ConfigError):
    """A trainable layer whose per-example gradients Opacus cannot compute correctly."""


def check_private_model(model: nn.Module) -> None:
    """Refuse trainable layers that mix examples (BatchNorm etc.), naming each and why.

    Opacus' `ModuleValidator` lists them; its messages are kept. Layers without an Opacus hook
    (e.g. LlamaRMSNorm, GPT-2's Conv1D) are fine: functorch computes their per-example gradients.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        lines = "\n".join(f"  - {error}" for error in errors)
        raise UnsupportedLayerError(
            "kdkit: DP-SGD cannot train this student as it is; Opacus reports:\n" + lines +
            "\n(layers that normalise over the batch mix examples, so no per-example gradient exists; "
            "replace BatchNorm by GroupNorm/LayerNorm, or freeze the layer)"
        )


def check_grad_samples(model: nn.Module, batch_size: int) -> None:
    """After a backward pass: every trainable parameter has one gradient per example.

    A layer whose input lacks the batch dimension (GPT-2's position embedding gets position_ids of
    shape [1, T]) yields per-"example" gradients of the wrong count, which would mis-clip silently.
    """
    owners = {id(p): name for name, p in model.named_parameters()}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            sample = getattr(p, "grad_sample", None)
            if sample is None:
                continue
            count = sample[-1].shape[0] if isinstance(sample, list) else sample.shape[0]
            if count != batch_size:
                raise UnsupportedLayerError(
                    f"kdkit: layer {module_name!r} ({type(module).__name__}) produced {count} per-example "
                    f"gradients for {owners.get(id(p), name)!r} in a batch of {batch_size}: its input does "
                    "not carry the batch dimension (e.g. a position embedding fed position_ids of shape "
                    "[1, T]). Freeze that layer (requires_grad_(False)) or feed it per-example inputs"
                )


# ---------------------------------------------------------------------------------------- loop


def _step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed for one step's sampling or noise, independent of anything else drawn."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def poisson_batch(records: int, sample_rate: float, seed: int, step: int) -> list[int]:
    """Indices of step `step`'s batch: each record independently with probability q (Opacus' sampler)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    generator = torch.Generator().manual_seed(_step_seed(seed, step, "sample"))
    sampler = UniformWithReplacementSampler(
        num_samples=records, sample_rate=sample_rate, generator=generator, steps=1
    )
    return next(iter(sampler))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _chunks(indices: Sequence[int], size: int | None) -> list[list[int]]:
    if not size:
        return [list(indices)]
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def train_private(
    distiller: Distiller,
    dataset: Dataset,
    cfg: TrainConfig,
    privacy: PrivacyConfig,
    run_dir: Path,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    resume: bool = False,
    description: str = "train (DP-SGD)",
    teacher_note: str | None = None,
) -> PrivateTrainResult:
    """Train `distiller` in place with DP-SGD for `cfg.steps` steps (see the module docstring).

    dataset: map-style; one item is one private record. collate_fn: list of records -> batch dict.
    cfg: lr, schedule, optimizer, steps, seed, checkpoint/log cadence; `batch_size` is the expected
        batch (q·N) unless `privacy.sample_rate` is set; `max_grad_norm` and `grad_accum_steps` are
        not used (per-example clipping at `privacy.max_grad_norm` replaces them).
    resume=True continues from run_dir's latest checkpoint (weights, optimizer, accountant history);
        each step's sample and noise are seeded by (seed, step), so the result equals an
        uninterrupted run.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    started = time.perf_counter()
    run_dir = Path(run_dir)
    history = run_dir / "metrics.jsonl"
    records = len(dataset)
    plan = plan_privacy(privacy, records, cfg)
    if cfg.grad_accum_steps != 1:
        raise ConfigError("config error at train.grad_accum_steps: DP-SGD batches are Poisson-sampled "
                          "whole; use privacy.max_physical_batch_size to bound memory instead")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    was_training = distiller.training
    distiller.to(device)
    distiller.move_teacher(device)
    check_private_model(distiller)

    gsm = GradSampleModule(distiller, batch_first=True, loss_reduction="mean",
                           force_functorch=privacy.grad_sample_mode == "functorch")
    optimizer = build_optimizer(distiller, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    noise_generator = None if privacy.secure_mode else torch.Generator(device=device)
    dp_optimizer = DPOptimizer(
        optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.sample_rate * records, loss_reduction="mean",
        generator=noise_generator, secure_mode=privacy.secure_mode,
    )
    params = [p for p in distiller.parameters() if p.requires_grad]

    step, elapsed, window, accounted, sampled_total, resumed_from = 0, 0.0, LossWindow(), 0, 0, None
    checkpoint.remove_leftovers(run_dir)
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints (latest: {latest.name}); pass "
                              "resume=True to continue that run, or choose an empty run folder")
    if latest is not None:
        saved, _ = checkpoint.load_checkpoint(latest, distiller, optimizer, scheduler, 0)
        step, elapsed, resumed_from = saved["step"], saved["elapsed_s"], saved["step"]
        window = LossWindow.from_dict(saved["window"])
        accounted, sampled_total = saved["privacy"]["steps"], saved["privacy"]["sampled"]
        if saved["privacy"]["plan"] != plan.to_dict():
            raise ConfigError(f"kdkit: {latest} was trained with privacy parameters "
                              f"{saved['privacy']['plan']}, not {plan.to_dict()}; resume with the same ones")
        logger.info("resuming DP training from %s", latest)
    elif resume:
        logger.warning("resume requested but %s has no checkpoint; starting fresh", run_dir)
    truncate_history(history, step)
    metrics = MetricsWriter(run_dir, enabled=True, purge_after=resumed_from)

    def spent(steps: int) -> float:
        history = [(plan.noise_multiplier, plan.sample_rate, steps)]
        return accountant_epsilon(history, plan.delta, plan.accountant)

    bar = tqdm(total=cfg.steps, initial=step, desc=description, dynamic_ncols=True, disable=not cfg.progress)
    last_record: dict[str, Any] | None = None
    checked = False
    window_batches: list[int] = []
    # Opacus' hooks fire on the first layer, whose input (token ids) needs no gradient: expected
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    try:
        gsm.train()
        session_start = window_start = time.perf_counter()
        train_time_s = elapsed
        while step < cfg.steps:
            lr = optimizer.param_groups[0]["lr"]
            indices = poisson_batch(records, plan.sample_rate, cfg.seed, step)
            torch.manual_seed(_step_seed(cfg.seed, step, "torch"))  # rollouts, dropout: resumable per step
            if noise_generator is not None:
                noise_generator.manual_seed(_step_seed(cfg.seed, step, "noise"))
            if not indices:  # an empty Poisson batch: the update is noise alone
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
                dp_optimizer.step()
            chunks = _chunks(indices, privacy.max_physical_batch_size) if indices else []
            for position, chunk in enumerate(chunks):
                batch = _to_device(collate_fn([dataset[i] for i in chunk]) if collate_fn else
                                   torch.utils.data.default_collate([dataset[i] for i in chunk]), device)
                losses = gsm(batch)
                total = total_loss(losses)
                total.backward()
                if not checked:
                    check_grad_samples(distiller, len(chunk))
                    checked = True
                window.add(losses, total, len(chunk))
                if position < len(chunks) - 1:
                    dp_optimizer.signal_skip_step(do_skip=True)  # clip and accumulate only
                dp_optimizer.step()
                if position < len(chunks) - 1:
                    dp_optimizer.zero_grad(set_to_none=True)
            dp_optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            accounted += 1
            sampled_total += len(indices)
            window_batches.append(len(indices))
            bar.update(1)
            now = time.perf_counter()
            if step % cfg.log_every == 0 or step == cfg.steps:
                means, examples = merge_windows([window.to_dict()])
                record = {"step": step, **means, "privacy/epsilon": spent(accounted),
                          "privacy/delta": plan.delta,
                          "privacy/mean_batch_size": sum(window_batches) / len(window_batches), "lr": lr,
                          "elapsed_s": round(elapsed + now - session_start, 3),
                          "examples_per_s": round(examples / max(now - window_start, 1e-9), 2)}
                metrics.write(record)
                last_record, window, window_start, window_batches = record, LossWindow(), now, []
                bar.set_postfix({"eps": f"{record['privacy/epsilon']:.3g}",
                                 "loss": f"{record.get('loss', float('nan')):.4g}"}, refresh=False)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save(run_dir, cfg, distiller, optimizer, scheduler, step,
                      elapsed + time.perf_counter() - session_start, window,
                      {"steps": accounted, "sampled": sampled_total, "plan": plan.to_dict()})
        train_time_s = elapsed + time.perf_counter() - session_start
    finally:
        quiet.__exit__(None, None, None)
        bar.close()
        metrics.close()
        _remove_opacus_state(gsm, distiller)
        distiller.train(was_training)

    epsilon = spent(accounted)
    statement = privacy_statement(plan.to_dict(), epsilon, accounted, secure_mode=privacy.secure_mode,
                                  teacher_note=teacher_note)
    statement["mean_batch_size"] = sampled_total / max(accounted, 1)
    (run_dir / "privacy.json").write_text(json.dumps(statement, indent=1))
    if not last_record and history.is_file():
        lines = [line for line in history.read_text().splitlines() if line.strip()]
        last_record = json.loads(lines[-1]) if lines else None
    skip = ("step", "lr", "elapsed_s", "examples_per_s")
    return PrivateTrainResult(
        steps=step,
        final_losses={k: float(v) for k, v in (last_record or {}).items()
                      if k not in skip and not k.startswith("privacy/")},
        history_path=history,
        wall_time_s=time.perf_counter() - started,
        resumed_from=resumed_from,
        epsilon=epsilon,
        plan=plan,
        mean_batch_size=statement["mean_batch_size"],
        train_time_s=train_time_s,
    )


def _remove_opacus_state(gsm: nn.Module, distiller: nn.Module) -> None:
    """Leave the distiller as it was: no hooks, no grad_sample attributes on its parameters."""
    gsm.remove_hooks()
    for p in distiller.parameters():
        for attr in ("grad_sample", "_forward_counter", "summed_grad", "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)
    for module in distiller.modules():
        for attr in ("activations", "max_batch_len"):
            if hasattr(module, attr):
                delattr(module, attr)


def _save(run_dir: Path, cfg: TrainConfig, distiller: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: Any, step: int, elapsed_s: float, window: LossWindow, privacy: dict[str, Any]) -> None:
    """One atomic checkpoint (engine layout) whose state.json also holds the accountant's progress."""
    temp = checkpoint.temp_dir(run_dir, step)
    checkpoint.remove_leftovers(run_dir)
    temp.mkdir(parents=True)
    checkpoint.write_rng(temp, 0)
    saved = {"step": step, "elapsed_s": elapsed_s, "seed": cfg.seed, "window": window.to_dict(),
             "privacy": privacy}
    checkpoint.write_main_files(temp, distiller, optimizer, scheduler, saved)
    checkpoint.publish(temp, checkpoint.checkpoint_dir(run_dir, step), cfg.keep_checkpoints)
