"""Settings of the training engine, shared by every kind of run (the `train:` section of a config)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from kdkit.settings import StrictModel


class TrainConfig(StrictModel):
    """How the student is optimised. `batch_size` is per process and per micro-step:
    the global batch is batch_size × processes × grad_accum_steps."""

    steps: PositiveInt = 1000
    batch_size: PositiveInt = 64
    grad_accum_steps: PositiveInt = 1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: PositiveFloat | None = 1.0
    mixed_precision: Literal["no", "auto", "bf16", "fp16"] = "auto"
    seed: int = 0
    checkpoint_every: PositiveInt = 500
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    num_workers: int = Field(0, ge=0)
    progress: bool = True
    deterministic: bool = True  # on GPUs: torch.use_deterministic_algorithms(warn_only=True) while training
