"""Token-level divergences against a sparse teacher target (a logit cache or a served teacher).

Used by the "divergence" objective when the teacher signal gives a `SparseTarget`; the losses and
which divergences are defined or biased on which target are in `kdkit.losses.sparse`. By default the
loss is computed from the student's hidden states in token chunks (`kdkit.losses.sparse_fused`:
no [tokens × vocabulary] tensor at all, prompt and padding positions never projected); the
materialised-logits form is used when the student's logits exist already, when the head cannot be
taken apart (`backbone_and_head`), or for a CE term at a distillation temperature other than 1.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdkit.losses.sparse import sparse_divergence
from kdkit.losses.tokens import shift
from kdkit.models.heads import UnsupportedHeadError
from kdkit.objectives.lm.base import StudentView
from kdkit.signals.base import SparseTarget


def sparse_terms(
    student: StudentView, labels: Tensor, target: SparseTarget, params: Any, *, ce_ratio: float = 0.0
) -> dict[str, Tensor]:
    """{"kd": ...} (and "ce" when ce_ratio > 0): the sparse divergence, fused when it can be.

    As for the dense "hidden" path, the gradient of kd + ce_ratio·ce rides on "kd" (with kd's value).
    """
    have_logits = student.has_logits or student.has_trained_logits
    fused = not have_logits and (ce_ratio == 0 or params.temperature == 1.0)
    if fused:
        try:
            hidden, head = student.hidden
        except (UnsupportedHeadError, ValueError, AttributeError, TypeError):
            fused = False
    if not fused:  # logits of the trained window only (the prompt positions predict no label)
        logits, window_labels = student.trained_logits
        window_target = target.from_position(student.start)
        return {"kd": sparse_token_divergence(logits, window_labels, window_target, params)}
    from kdkit.losses.sparse_fused import fused_sparse_divergence

    hidden, targets, mask = shift(hidden, labels)  # positions t predict labels t + 1
    _check_ids(target, mask, head.weight.shape[0])
    out = fused_sparse_divergence(
        hidden,
        head,
        target.ids,
        logprobs=target.logprobs,
        weights=target.weights,
        tail_logprob=target.tail_logprob,
        entropy=target.entropy,
        mask=mask,
        divergence=params.divergence,
        temperature=params.temperature,
        targets=targets if ce_ratio else None,
        ce_weight=ce_ratio,
        chunk_size=getattr(params, "chunk_size", None),
        **params.divergence_params,
    )
    if not ce_ratio:
        return {"kd": out.loss}
    return {"kd": out.loss - ce_ratio * out.ce, "ce": out.ce}


def _check_ids(target: SparseTarget, mask: Tensor, vocab: int) -> None:
    kept = target.ids[mask]
    if kept.numel() and int(kept.max()) >= vocab:
        raise ValueError(
            f"the teacher target holds token id {int(kept.max())}, outside the student's {vocab:,} logits: "
            "teacher and student vocabularies differ"
        )


def sparse_token_divergence(
    student_logits: Tensor, labels: Tensor, target: SparseTarget, params: Any
) -> Tensor:
    """Mean divergence over the trained tokens between a sparse teacher target and the student.

    student_logits: [B, T, V_S]; labels: [B, T]; target: over shifted positions [B, T-1, K].
    params: the divergence objective's (divergence, divergence_params, temperature).
    Returns nats per token (no T² factor); 0 with zero gradients when no token counts.
    """
    student, _, mask = shift(student_logits, labels)
    _check_ids(target, mask, student.shape[-1])
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
