"""The one contract between methods and the training engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def freeze(module: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with no gradients; returns it for chaining."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class Distiller(nn.Module):
    """A student plus any learnable parts of the loss (projectors), with a frozen teacher beside it.

    The teacher is deliberately *not* a submodule: DDP/FSDP wrap only what is trained, the
    optimizer and checkpoints never see teacher weights, and `.train()` never flips the teacher
    out of eval mode. Subclasses implement `forward(batch) -> dict[str, Tensor]` returning the
    named, already-weighted scalar loss terms; the engine backpropagates their sum and logs each.
    Keys starting with "_" are diagnostics (detached scalars: generation time, token counts, term
    magnitudes): logged as "diag/<name>", never added to the loss.

    `_tokens` is the one diagnostic the engine acts on: the number of tokens the micro-batch's terms
    are means over. A distiller that returns it (always, on every micro-batch) gets token-weighted
    gradient accumulation: the step's gradient is that of the mean over every token trained on in
    the optimizer step, across micro-batches and processes, and the logged terms are token-weighted
    means too. Without it, micro-batches (of equal size) weigh alike. Terms must stay finite when
    `_tokens` is 0 (a mean over no tokens is best returned as 0).

    Step hook: before the micro-batches of each optimizer step the engine calls
    `on_step(step)` with the step's 0-based index (also on resume, from the checkpoint's step), so
    terms with schedules (warm-ups, annealed weights) count optimizer steps, not forward calls.
    The default sets `global_step` and calls `on_step(step)` on every submodule that defines one
    (objective terms, samplers held as modules). Hooks should *set* state from `step`, never
    increment it, so that they are idempotent and exact after a resume. Outside the engine, call
    `distiller.on_step(step)` yourself before each optimizer step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self._teacher: list[nn.Module] = [freeze(teacher)] if teacher is not None else []
        self.global_step: int | None = None  # 0-based optimizer step; None until `on_step` announces one

    def on_step(self, step: int) -> None:
        """Called by the engine before the micro-batches of optimizer step `step` (0-based)."""
        self.global_step = step
        for module in self.modules():
            if module is self:
                continue
            if isinstance(module, Distiller):
                module.global_step = step  # a nested distiller's own submodules are visited here too
                continue
            hook = getattr(module, "on_step", None)
            if callable(hook):
                hook(step)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def move_teacher(self, device: torch.device | str) -> None:
        """Called by the engine once the accelerator has chosen the device."""
        if self._teacher:
            self._teacher[0] = freeze(self._teacher[0].to(device))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class CrossEntropyDistiller(Distiller):
    """No teacher: trains `student` on labels alone (a teacher itself, or a from-scratch baseline).

    batch: {"inputs": [B, ...], "labels": [B] int64}. Returns {"ce": scalar mean cross-entropy, nats}.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student, teacher=None)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.student(batch["inputs"])
        return {"ce": F.cross_entropy(logits, batch["labels"])}
