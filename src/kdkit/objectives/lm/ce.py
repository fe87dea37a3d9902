"""Cross-entropy on the batch's label tokens: the supervised term (no teacher) of `LMDistiller`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.losses.fused import LinearHead
from kdkit.losses.tokens import IGNORE_INDEX, shift
from kdkit.objectives.lm.base import StudentView


def completion_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) over label tokens: [B, T, V], [B, T] -> scalar."""
    logits, targets, mask = shift(student_logits, labels)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (per_token * mask.flatten()).sum() / mask.sum().clamp(min=1)


def chunked_cross_entropy(hidden: Tensor, head: LinearHead, labels: Tensor, chunk_size: int = 1024) -> Tensor:
    """`completion_cross_entropy` from final hidden states and the LM head, in token chunks.

    hidden: [B, T, H], labels: [B, T]. Only trained positions are projected, at most `chunk_size`
    at a time, so the full [B·T, V] logits never exist at once in the forward pass.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows, wanted = hidden[:, :-1][mask], targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        logits = head.logits(rows[start : start + chunk_size]).float()
        total = total + F.cross_entropy(logits, wanted[start : start + chunk_size], reduction="sum")
    return total / mask.sum().clamp(min=1)


def student_cross_entropy(student: StudentView, labels: Tensor) -> Tensor:
    """CE from whichever student output the batch already computed (logits of the trained positions,
    full logits or hidden states), else from the logits of the trained positions.

    labels: [B, T], the view's batch labels (a window of them is taken with the windowed logits).
    """
    if student.has_logits:
        return completion_cross_entropy(student.logits, labels)
    if "hidden" in student.__dict__:
        hidden, head = student.hidden
        return chunked_cross_entropy(hidden, head, labels)
    logits, _ = student.trained_logits
    return completion_cross_entropy(logits, labels[:, student.start :])
