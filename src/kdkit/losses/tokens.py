"""Token-level helpers shared by LM objectives and evaluation: pure functions on tensors.

Conventions: position t of the logits predicts token t+1, so logits[:, :-1] pair with labels[:, 1:]
(`shift`); a position counts when its shifted label is not `IGNORE_INDEX` (completion tokens only,
never the prompt or padding).
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there (PyTorch/HF convention)


def shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pair next-token predictions with their targets.

    logits: [B, T, V], labels: [B, T] (-100 = not trained) -> (logits [B, T-1, V],
    targets [B, T-1] with -100 replaced by 0, mask [B, T-1] bool, True = trained on).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits[:, :-1], targets.masked_fill(~mask, 0), mask


def shared_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Cut [..., V_S] and [..., V_T] logits to their shared first min(V_S, V_T) ids (views).

    Only correct when the two vocabularies are one tokenizer's padded to different sizes; callers
    check that first (`kdkit.models.tokenizers.check_vocabularies`).
    """
    size = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :size], teacher_logits[..., :size]


def token_log_probs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T)[targets]: [B, T, V] and [B, T] -> [B, T], float32 at least."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def count_tokens(labels: Tensor) -> Tensor:
    """Number of trained (shifted) label tokens in a [B, T] batch: a 0-dim long tensor."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def first_trained_position(labels: Tensor) -> int:
    """The first position whose prediction is trained on in any row: logits before it are never read.

    labels: [B, T]. Position t predicts labels[:, t + 1], so with prompts of P tokens this is P - 1
    for the shortest prompt. 0 when no token is trained (nothing to save then).
    """
    trained = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return int(trained[0, 0]) if trained.numel() else 0


__all__ = [
    "IGNORE_INDEX",
    "count_tokens",
    "first_trained_position",
    "shared_vocab",
    "shift",
    "token_log_probs",
]
