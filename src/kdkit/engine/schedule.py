"""Optimizer and learning-rate schedule built from a TrainConfig."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from kdkit.engine.settings import TrainConfig
from kdkit.settings import ConfigError


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the peak lr for the optimizer step with 0-based index `step`.

    Warm-up rises linearly, (step + 1) / (warmup_steps + 1), so no step runs at lr 0; the peak is
    reached at step `warmup_steps`. After that "constant" stays at 1 and "cosine" decays as
    0.5·(1 + cos(π·t)), t = (step − warmup) / (total − warmup), ending just above 0.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ConfigError(f"config error at train.schedule: "
                      f"{schedule!r} is not a schedule (known: cosine, constant)")


def build_optimizer(model: nn.Module, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over the parameters of `model` that require grad.

    fused: AdamW's fused step (`torch.optim.AdamW(fused=True)`: the same update in one kernel per
    parameter instead of a dozen ops; TRL's Trainer default, `adamw_torch_fused`), when every
    parameter is a floating-point tensor. Callers pass it for devices whose torch has the kernel
    (CPU, CUDA) and runs without an fp16 loss scaler; the DP engine keeps the plain step that
    Opacus wraps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the distiller has no trainable parameters (is the student frozen?)")
    if cfg.optimizer == "adamw":
        fused = fused and all(p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state_dict holds only numbers."""

    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             schedule=cfg.schedule)

    return LambdaLR(optimizer, factor)
