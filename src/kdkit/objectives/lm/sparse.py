"""Token-level divergences against a sparse teacher target (a logit cache or a served teacher).

Used by the "divergence" objective when the teacher signal gives a `SparseTarget`; the losses and
which divergences are defined or biased on which target are in `kdkit.losses.sparse`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdkit.losses.sparse import sparse_divergence
from kdkit.losses.tokens import shift
from kdkit.signals.base import SparseTarget


def sparse_token_divergence(
    student_logits: Tensor, labels: Tensor, target: SparseTarget, params: Any
) -> Tensor:
    """Mean divergence over the trained tokens between a sparse teacher target and the student.

    student_logits: [B, T, V_S]; labels: [B, T]; target: over shifted positions [B, T-1, K].
    params: the divergence objective's (divergence, divergence_params, temperature).
    Returns nats per token (no T² factor); 0 with zero gradients when no token counts.
    """
    student, _, mask = shift(student_logits, labels)
    vocab = student.shape[-1]
    kept = target.ids[mask]
    if kept.numel() and int(kept.max()) >= vocab:
        raise ValueError(
            f"the teacher target holds token id {int(kept.max())}, outside the student's {vocab:,} logits: "
            "teacher and student vocabularies differ"
        )
    return sparse_divergence(
        student,
        target.ids,
        logprobs=target.logprobs,
        weights=target.weights,
        tail_logprob=target.tail_logprob,
        entropy=getattr(target, "entropy", None),
        divergence=params.divergence,
        temperature=params.temperature,
        mask=mask,
        reduction="mean",
        **params.divergence_params,
    )
