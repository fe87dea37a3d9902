"""MaKD multi-aspect distillation terms (Liu et al. 2026): pure functions on lists of per-layer tensors.

Aspects, each a raw (unweighted) term averaged over the matched layer pairs:

- "attn_kl": KL(A_T ‖ A_S) between self-attention probability rows (`features.attention_kl`);
- "hidden_mse": MSE between hidden states (the embedding output and each matched layer's output);
- "attn_out_mse": MSE between each matched layer's attention-block output (its contribution before
  the residual add, e.g. BERT's `attention.output.dense`, Llama's `self_attn`);
- "ffn_out_mse": MSE between each matched layer's feed-forward-block output (BERT's `output.dense`,
  Llama's `mlp`).

Widths must already agree: a learned projection for students narrower than the teacher belongs to
the method (it is a trainable module), not here. `layer_pairs` turns a mapping strategy into
(student layer, teacher layer) index pairs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kdkit.losses.features import attention_kl, hidden_mse

ASPECTS = ("attn_kl", "hidden_mse", "attn_out_mse", "ffn_out_mse")


def layer_pairs(
    num_student: int, num_teacher: int, mapping: str | Sequence[int] | Sequence[Sequence[int]] = "uniform"
) -> list[tuple[int, int]]:
    """Which teacher layer each student layer learns from, as (student, teacher) 0-based pairs.

    mapping:
      "uniform"  — student layer i of n_S ↦ teacher layer ⌈(i+1)·n_T/n_S⌉ − 1 (TinyBERT's m·n_T/n_S:
                   the student's last layer always meets the teacher's last layer);
      "last:K"   — only the student's last K layers, matched to the teacher's last K layers;
      [t_0, ..., t_{n_S−1}] — explicit teacher layer for every student layer (e.g. the layers a
                   layer-selected student was built from; negative indices count from the end);
      [[s, t], ...] — explicit pairs.
    """
    if num_student < 1 or num_teacher < 1:
        raise ValueError(
            f"layer_pairs needs at least one layer on each side, got {num_student}, {num_teacher}"
        )

    def teacher_index(t: int) -> int:
        if not -num_teacher <= t < num_teacher:
            raise ValueError(f"teacher layer {t} is out of range for a {num_teacher}-layer teacher")
        return t % num_teacher

    if isinstance(mapping, str):
        spec = mapping.strip()
        if spec == "uniform":
            return [(i, -(-(i + 1) * num_teacher // num_student) - 1) for i in range(num_student)]
        match = re.fullmatch(r"last:(\d+)", spec)
        if match is None:
            raise ValueError(
                f"layer mapping {mapping!r}: use 'uniform', 'last:K' or a list of teacher layers"
            )
        k = int(match.group(1))
        if not 1 <= k <= min(num_student, num_teacher):
            raise ValueError(
                f"layer mapping {mapping!r}: K must be between 1 and {min(num_student, num_teacher)}"
            )
        return [(num_student - k + j, num_teacher - k + j) for j in range(k)]
    items = list(mapping)
    if items and all(isinstance(item, Sequence) and not isinstance(item, str) for item in items):
        pairs = []
        for item in items:
            if len(item) != 2:
                raise ValueError(f"layer mapping pair {item!r} must be [student, teacher]")
            s, t = int(item[0]), int(item[1])
            if not -num_student <= s < num_student:
                raise ValueError(f"student layer {s} is out of range for a {num_student}-layer student")
            pairs.append((s % num_student, teacher_index(t)))
        return pairs
    if len(items) != num_student:
        raise ValueError(
            f"layer mapping lists {len(items)} teacher layers for a {num_student}-layer student "
            "(one per layer)"
        )
    return [(i, teacher_index(int(t))) for i, t in enumerate(items)]


def _mean(terms: list[Tensor]) -> Tensor:
    return torch.stack(terms).mean()


def multi_aspect_terms(
    student: Mapping[str, Sequence[Tensor]],
    teacher: Mapping[str, Sequence[Tensor]],
    pairs: Sequence[tuple[int, int]],
    *,
    mask: Tensor | None = None,
    aspects: Sequence[str] = ASPECTS,
    match_embeddings: bool = True,
) -> dict[str, Tensor]:
    """Raw MaKD terms for the matched layer pairs.

    student, teacher: per-layer features, keys
      "attentions": L tensors [B, H, T, T] (attention probabilities, rows sum to 1);
      "hidden_states": L + 1 tensors [B, T, D] (embedding output first, as Hugging Face returns them);
      "attention_out", "ffn_out": L tensors [B, T, D] (block outputs before the residual add).
    Student widths must equal the teacher's (project first); head counts must agree for "attn_kl".
    pairs: (student layer, teacher layer) from `layer_pairs`.
    mask: [B, T] bool, True = a real token (padding never counts, as query or as MSE position).
    match_embeddings: also match the embedding outputs (hidden_states[0]) in "hidden_mse".
    Returns {aspect: scalar} for each requested aspect: attn_kl in nats per attention row (mean over
    heads, rows and pairs); the MSEs per element, averaged over real positions and pairs.
    """
    unknown = [a for a in aspects if a not in ASPECTS]
    if unknown:
        raise ValueError(f"unknown MaKD aspect(s) {unknown}; known: {', '.join(ASPECTS)}")
    if not pairs:
        raise ValueError("multi_aspect_terms needs at least one layer pair")
    out: dict[str, Tensor] = {}
    for aspect in aspects:
        key = {
            "attn_kl": "attentions",
            "hidden_mse": "hidden_states",
            "attn_out_mse": "attention_out",
            "ffn_out_mse": "ffn_out",
        }[aspect]
        if key not in student or key not in teacher:
            raise KeyError(f"aspect {aspect!r} needs {key!r} features from both student and teacher")
        s_feats, t_feats = student[key], teacher[key]
        terms = []
        if aspect == "attn_kl":
            for s, t in pairs:
                terms.append(attention_kl(s_feats[s], t_feats[t], mask))
        elif aspect == "hidden_mse":
            hidden_pairs = [(s + 1, t + 1) for s, t in pairs]
            if match_embeddings:
                hidden_pairs = [(0, 0), *hidden_pairs]
            for s, t in hidden_pairs:
                terms.append(hidden_mse(s_feats[s], t_feats[t], mask))
        else:
            for s, t in pairs:
                terms.append(hidden_mse(s_feats[s], t_feats[t], mask))
        out[aspect] = _mean(terms)
    return out


__all__ = ["ASPECTS", "layer_pairs", "multi_aspect_terms"]
