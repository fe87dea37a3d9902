"""Logit distillation losses for classifiers: Hinton KD, Decoupled KD (DKD) and DIST.

All take logits [B, C] (any float dtype; computed in float32 at least) and return losses in nats
averaged over the batch (KL "batchmean"), with the T² factor where the method prescribes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdkit.losses.divergences import DIVERGENCES, forward_kl, temperature_log_probs


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 4.0,
    t2_scaling: bool = True,
    reduction: str = "mean",
    divergence: str = "fkl",
    **divergence_params: Any,
) -> Tensor:
    """Hinton et al. (2015) soft-target loss: KL(p_T ‖ p_S) at temperature T, times T² if `t2_scaling`.

    `divergence` names any entry of `DIVERGENCES` (default forward KL, Hinton's choice) and
    `divergence_params` its own parameters (beta, alpha, f), so rkl, jsd, tvd, skew KL work too.
    The T² factor keeps the gradient magnitude of the soft term roughly independent of T (the
    gradients of KL at temperature T scale as 1/T²), so it can be mixed with cross-entropy at a fixed
    weight; turn it off to get the plain divergence.
    student_logits, teacher_logits: [..., C]   reduction: "mean" (over examples), "sum" or "none" [...].
    Returns nats (× T²).
    """
    fn = DIVERGENCES.get(divergence)
    loss = fn(
        student_logits, teacher_logits, temperature=temperature, reduction=reduction, **divergence_params
    )
    return loss * temperature**2 if t2_scaling else loss


def _target_mask(logits: Tensor, labels: Tensor) -> Tensor:
    """[B, C] bool, True at each example's label."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, labels.long().unsqueeze(-1), True)


def _binary_log_probs(log_probs: Tensor, target: Tensor) -> Tensor:
    """[B, C] log-probs -> [B, 2] log (p_target, 1 − p_target), the non-target mass by logsumexp."""
    log_target = log_probs.masked_fill(~target, float("-inf")).logsumexp(-1)
    log_other = log_probs.masked_fill(target, float("-inf")).logsumexp(-1)
    return torch.stack([log_target, log_other], dim=-1)


def dkd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """The two terms of Decoupled KD (Zhao et al., CVPR 2022), each × T², for logging.

    TCKD: KL between the binary (target, non-target) distributions of teacher and student.
    NCKD: KL(p̂_T ‖ p̂_S) over the non-target classes only (target removed exactly, not by a −1000
          offset, then renormalised).
    Per example, KL(p_T ‖ p_S) = TCKD + (1 − p_T(target))·NCKD (before T²): classic KD couples NCKD to
    the teacher's confidence; DKD weights the two freely.
    student_logits, teacher_logits: [B, C] with C ≥ 2   labels: [B] int class ids
    Returns (tckd, nckd): scalars for "mean" (over examples)/"sum", or [B] each for "none".
    """
    target = _target_mask(student_logits, labels)
    log_s = temperature_log_probs(student_logits, temperature)
    log_t = temperature_log_probs(teacher_logits, temperature).to(log_s.dtype)
    scale = temperature**2
    # binary log-probs are valid logits of themselves, so the divergence library applies directly
    tckd = forward_kl(_binary_log_probs(log_s, target), _binary_log_probs(log_t, target), reduction=reduction)
    nckd = forward_kl(
        log_s.masked_fill(target, float("-inf")),
        log_t.masked_fill(target, float("-inf")),
        reduction=reduction,
    )
    return tckd * scale, nckd * scale


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD: alpha·TCKD + beta·NCKD (see `dkd_parts`), averaged over the batch, × T².

    Defaults are the paper's CIFAR-100 settings (α=1, β=8, T=4). The paper also ramps the loss in over
    the first epochs and adds cross-entropy; both belong to the method, not to this function.
    student_logits, teacher_logits: [B, C]   labels: [B]   Returns a scalar.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, labels, temperature=temperature)
    return alpha * tckd + beta * nckd


def _pearson(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Pearson correlation of the rows of a and b: [N, M] -> [N].

    A row with no variation has an undefined correlation; the norm product is floored at eps, so such a
    row counts as uncorrelated (0), as in the reference DIST code.
    """
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): match relations, not exact probabilities.

    On y = softmax(logits / T) [B, C]:
      inter-class = 1 − mean_b Pearson(y_S[b, :], y_T[b, :])   (each example's ranking of classes)
      intra-class = 1 − mean_c Pearson(y_S[:, c], y_T[:, c])   (each class's spread over the batch)
    Returns T²·(beta·inter + gamma·intra), a scalar in [0, 2·T²·(beta + gamma)]; 0 when the student's
    probabilities are a positive affine image of the teacher's. The intra term needs B ≥ 2 (with B = 1
    every column is constant and the term is a constant 1).
    student_logits, teacher_logits: [B, C]
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dist_loss wants matching [B, C] logits, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    y_s = temperature_log_probs(student_logits, temperature).exp()
    y_t = temperature_log_probs(teacher_logits, temperature).exp().to(y_s.dtype)
    inter = 1.0 - _pearson(y_s, y_t).mean()
    intra = 1.0 - _pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
    return temperature**2 * (beta * inter + gamma * intra)


__all__ = ["dist_loss", "dkd_loss", "dkd_parts", "kd_loss"]
