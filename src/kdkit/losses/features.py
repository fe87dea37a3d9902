"""Feature-matching losses: hints (FitNets), cosine, attention transfer, attention KL, hidden-state MSE.

Pure functions on tensors with matching shapes: a projector that maps student widths onto teacher
widths is a learnable module and belongs to the method that owns it, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.losses.divergences import reduce_positions


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} differ "
            "(project the student features to the teacher's width first)"
        )


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def hint_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNets hint: mean squared error over all elements.

    student_feat, teacher_feat: same shape, e.g. [B, C, H, W] or [B, T, D]   Returns a scalar.
    """
    _same_shape(student_feat, teacher_feat, "hint_loss")
    return F.mse_loss(_upcast(student_feat), _upcast(teacher_feat).to(_upcast(student_feat).dtype))


def cosine_feature_loss(a: Tensor, b: Tensor, *, dim: int = -1) -> Tensor:
    """1 − cosine similarity along `dim`, averaged over everything else; in [0, 2].

    a, b: same shape, e.g. [B, D] pooled embeddings   Returns a scalar (0 when a ∝ b with a positive
    factor). Scale-free, so it suits embeddings whose norms differ between teacher and student.
    """
    _same_shape(a, b, "cosine_feature_loss")
    a = _upcast(a)
    return (1.0 - F.cosine_similarity(a, _upcast(b).to(a.dtype), dim=dim, eps=1e-8)).mean()


def _spatial_energy(feat: Tensor, p: float) -> Tensor:
    """[B, C, H, W] -> [B, H, W]: mean over channels of |f|^p (channel counts may differ S vs T)."""
    if feat.dim() != 4:
        raise ValueError(f"attention maps want [B, C, H, W] features, got {tuple(feat.shape)}")
    return _upcast(feat).abs().pow(p).mean(1)


def attention_map(feat: Tensor, p: float = 2) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (2017).

    feat: [B, C, H, W] -> [B, H*W]: mean over channels of |f|^p, flattened, L2-normalised per example.
    """
    return F.normalize(_spatial_energy(feat, p).flatten(1), dim=1)


def attention_transfer_loss(
    student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor], p: float = 2
) -> Tensor:
    """Attention transfer: Σ over layer pairs of mean_(b, h·w) (map_S − map_T)².

    student_feats, teacher_feats: one [B, C, H, W] tensor each, or equal-length sequences of them (one
    per matched layer; channels may differ). Where the spatial sizes of a pair differ, the larger
    |f|^p map is adaptive-average-pooled to the smaller size before normalisation.
    Returns a scalar; sums over layers as the reference code does (the paper weights it by β/2 = 500
    there, which is the caller's weight).
    """
    if isinstance(student_feats, Tensor):
        student_feats, teacher_feats = [student_feats], [teacher_feats]
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(
            f"attention_transfer_loss wants matched layers, got {len(student_feats)} student "
            f"and {len(teacher_feats)} teacher feature maps"
        )
    terms = []
    for fs, ft in zip(student_feats, teacher_feats):
        es, et = _spatial_energy(fs, p), _spatial_energy(ft, p)
        size = (min(es.shape[-2], et.shape[-2]), min(es.shape[-1], et.shape[-1]))
        # adaptive pooling only where needed: it is the identity for equal sizes, but costs a copy
        es = es if es.shape[-2:] == size else F.adaptive_avg_pool2d(es.unsqueeze(1), size).squeeze(1)
        et = et if et.shape[-2:] == size else F.adaptive_avg_pool2d(et.unsqueeze(1), size).squeeze(1)
        ms, mt = F.normalize(es.flatten(1), dim=1), F.normalize(et.flatten(1), dim=1).to(es.dtype)
        terms.append((ms - mt).square().mean())
    return torch.stack(terms).sum()


def attention_kl(student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(A_T ‖ A_S) between attention probability rows, averaged over counted rows (MiniLM, MaKD).

    student_attn, teacher_attn: [B, H, Q, K] attention probabilities (softmax outputs, rows sum to 1;
      e.g. Hugging Face `output_attentions=True`). Masked keys have probability 0 in both: 0·log 0 = 0.
    mask: [B, Q] bool, True = the query position counts (e.g. the attention mask of the queries).
    Returns nats, a scalar: Σ_k per row, mean over heads and counted query positions. Student zeros
    where the teacher has mass are floored at 1e-30 (large but finite instead of +inf).
    """
    _same_shape(student_attn, teacher_attn, "attention_kl")
    if student_attn.dim() != 4:
        raise ValueError(f"attention_kl wants [B, H, Q, K] attentions, got {tuple(student_attn.shape)}")
    a_s = _upcast(student_attn)
    a_t = _upcast(teacher_attn).to(a_s.dtype)
    # floors, not xlogy: finite gradients for both sides even at exact zeros (0·finite = 0)
    per_row = (a_t * (a_t.clamp_min(1e-30).log() - a_s.clamp_min(1e-30).log())).sum(-1)  # [B, H, Q]
    row_mask = None if mask is None else mask.bool()[:, None, :].expand_as(per_row)
    return reduce_positions(per_row, row_mask, "mean")


def hidden_mse(student_h: Tensor, teacher_h: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error of hidden states over the feature dim, averaged over counted positions.

    student_h, teacher_h: [B, T, D] (project the student to D first)   mask: [B, T] bool, True = counts
    Returns a scalar: mean over counted (b, t) of mean_d (h_S − h_T)²; padding never dilutes it.
    """
    _same_shape(student_h, teacher_h, "hidden_mse")
    h_s = _upcast(student_h)
    per_position = (h_s - _upcast(teacher_h).to(h_s.dtype)).square().mean(-1)
    return reduce_positions(per_position, None if mask is None else mask.bool(), "mean")


__all__ = [
    "attention_kl",
    "attention_map",
    "attention_transfer_loss",
    "cosine_feature_loss",
    "hidden_mse",
    "hint_loss",
]
