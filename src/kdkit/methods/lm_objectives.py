"""Token-level LM objectives on logits: divergence KD, the sampled-token advantage loss, and CE.

Conventions shared by every function here:
- Position t of the logits predicts token t+1, so logits[:, :-1] are paired with labels[:, 1:]
  (`shift`). A position counts when its shifted label is not -100: completion tokens only, never
  the prompt or padding.
- Means are over the counted tokens of the whole batch (the tokens actually trained on), not over
  sequences or the batch size, so a batch of long samples and one of short samples weigh each
  token alike.
- Teacher and student vocabularies that differ only by embedding padding (same tokenizer) are cut
  to the shared first min(V_S, V_T) ids (`shared_vocab`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.data.padding import IGNORE_INDEX
from kdkit.losses import DIVERGENCES


def shift(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pair next-token predictions with their targets.

    logits: [B, T, V], labels: [B, T] (-100 = not trained) -> (logits [B, T-1, V],
    targets [B, T-1] with -100 replaced by 0, mask [B, T-1] bool, True = trained on).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits[:, :-1], targets.masked_fill(~mask, 0), mask


def shared_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Cut [..., V_S] and [..., V_T] logits to their shared first min(V_S, V_T) ids (views)."""
    size = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :size], teacher_logits[..., :size]


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str = "fkl",
    temperature: float = 1.0,
    **divergence_kwargs: Any,
) -> Tensor:
    """Mean per-token divergence D(p_T, p_S) over completion tokens (nats, no T² factor).

    student_logits: [B, T, V_S], teacher_logits: [B, T, V_T], labels: [B, T].
    `divergence` names an entry of `kdkit.losses.DIVERGENCES`; its own kwargs (beta, alpha, f)
    pass through. `temperature` is the distillation temperature (not the sampling one).
    Returns a scalar; 0 with zero gradients when no token counts.
    """
    student, targets, mask = shift(student_logits, labels)
    teacher = teacher_logits[:, :-1]
    student, teacher = shared_vocab(student, teacher)
    fn = DIVERGENCES.get(divergence)
    return fn(student, teacher, temperature=temperature, mask=mask, reduction="mean", **divergence_kwargs)


def token_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[targets]: [B, T, V] and [B, T] -> [B, T], float32 at least."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def discounted_returns(values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """R_t = Σ_{k≥t} γ^{k−t} values_k over counted positions of each row: [B, T] -> [B, T].

    Masked positions contribute 0 and get 0; γ=0 returns `values` (masked) unchanged.
    """
    values = values * mask
    if gamma == 0.0:
        return values
    out = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def sampled_token_loss(
    student_logits: Tensor,
    teacher_token_log_probs: Tensor,
    labels: Tensor,
    *,
    coef: float = 1.0,
    gamma: float = 0.0,
    importance_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """On-policy distillation from the teacher's log-probs of the sampled tokens only.

    student_logits: [B, T, V] (with grad), labels: [B, T] (the sampled completion, -100 elsewhere),
    teacher_token_log_probs: [B, T-1] = log p_T(y_{t+1} | y_≤t), aligned with the shifted labels
    (a remote teacher can return just these numbers).
    Per token: A_t = −coef·(log p_S(y_t) − log p_T(y_t)), detached; with γ>0 A_t is replaced by the
    discounted sum of future terms Σ_{k≥t} γ^{k−t} A_k. loss = −mean_t [A_t · log p_S(y_t)] over
    completion tokens. Samples drawn by the current student at this very step have importance
    ratio p_S/p_old = 1 exactly (the default, None); samples from another policy (the teacher, an
    older student) pass `importance_weights` [B, T-1], detached, multiplying each token's term.
    Gradient descent raises log p_S(y_t) where the teacher likes y_t more than the student does
    (A_t > 0) and lowers it otherwise.
    Returns (loss scalar, diagnostics: "log_ratio" = mean(log p_S − log p_T) over sampled tokens,
    a Monte-Carlo estimate of KL(p_S ‖ p_T) per token when the samples are the student's).
    """
    logits, targets, mask = shift(student_logits, labels)
    log_p_s = token_log_probs(logits, targets)
    log_ratio = (log_p_s - teacher_token_log_probs.to(log_p_s.dtype)).detach()
    advantage = discounted_returns(-coef * log_ratio, mask, gamma)
    count = mask.sum().clamp(min=1)
    if importance_weights is not None:
        advantage = advantage * importance_weights.detach()
    loss = -(advantage * log_p_s * mask).sum() / count
    diagnostics = {
        "log_ratio": (log_ratio * mask).sum() / count,
        "advantage": (advantage * mask).sum() / count,
    }
    return loss, diagnostics


def completion_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) over label tokens: [B, T, V], [B, T] -> scalar."""
    logits, targets, mask = shift(student_logits, labels)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (per_token * mask.flatten()).sum() / mask.sum().clamp(min=1)


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 1024) -> Tensor:
    """`completion_cross_entropy` from final hidden states and the LM head, in token chunks.

    hidden: [B, T, H], weight: [V, H], labels: [B, T]. Only trained positions are projected, at
    most `chunk_size` at a time, so the full [B·T, V] logits never exist at once in the forward
    pass (autograd keeps each chunk's logits for backward; use the fused KD loss for the big term).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows, wanted = hidden[:, :-1][mask], targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_size):
        logits = rows[start : start + chunk_size] @ weight.T
        total = total + F.cross_entropy(logits.float(), wanted[start : start + chunk_size], reduction="sum")
    return total / mask.sum().clamp(min=1)
