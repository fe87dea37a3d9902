"""Feature losses against direct formulas, shapes, masking and resizing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.losses import (
    attention_kl,
    attention_map,
    attention_transfer_loss,
    cosine_feature_loss,
    hidden_mse,
    hint_loss,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_hint_loss_is_mse_and_checks_shapes():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(hint_loss(a, b), ((a - b) ** 2).mean())
    assert hint_loss(a, a.clone()).item() == 0.0
    with pytest.raises(ValueError, match="project"):
        hint_loss(a, torch.randn(2, 5, 4, 4))


def test_hint_loss_upcasts_half():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    got = hint_loss(a.bfloat16(), b.bfloat16())
    assert got.dtype == torch.float32


def test_cosine_feature_loss():
    a = torch.randn(5, 16)
    assert cosine_feature_loss(a, 3.0 * a).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert cosine_feature_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    b = torch.randn(5, 16)
    expected = (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()
    torch.testing.assert_close(cosine_feature_loss(a, b), expected)
    # dim picks the axis the cosine runs along
    torch.testing.assert_close(cosine_feature_loss(a.T, b.T, dim=0), expected)


def test_attention_map_definition():
    feat = torch.randn(3, 8, 5, 6)
    am = attention_map(feat)
    assert am.shape == (3, 30)
    torch.testing.assert_close(am.norm(dim=1), torch.ones(3))
    expected = F.normalize(feat.pow(2).mean(1).view(3, -1), dim=1)  # Zagoruyko's at(x)
    torch.testing.assert_close(am, expected)
    p1 = attention_map(feat, p=1)
    torch.testing.assert_close(p1, F.normalize(feat.abs().mean(1).view(3, -1), dim=1))


def test_attention_transfer_loss_matches_reference_and_sums_layers():
    fs = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    ft = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]  # channel counts differ: fine
    expected = sum((attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(fs, ft))
    torch.testing.assert_close(attention_transfer_loss(fs, ft), expected)
    torch.testing.assert_close(
        attention_transfer_loss(fs[0], ft[0]), (attention_map(fs[0]) - attention_map(ft[0])).pow(2).mean()
    )
    assert attention_transfer_loss(fs, [f.clone() for f in fs]).item() == 0.0


def test_attention_transfer_resizes_by_average_pooling():
    student = torch.randn(2, 4, 4, 4)
    # a teacher map that is the student's energy repeated 2x2: pooling it back recovers the student's
    teacher = student.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-10)
    assert attention_transfer_loss(teacher, student).item() == pytest.approx(0.0, abs=1e-10)
    other = torch.randn(2, 4, 8, 8)
    assert attention_transfer_loss(student, other).item() > 1e-4


def test_attention_transfer_rejects_mismatched_layers():
    with pytest.raises(ValueError, match="matched layers"):
        attention_transfer_loss([torch.randn(1, 2, 4, 4)], [])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        attention_transfer_loss(torch.randn(2, 4, 4), torch.randn(2, 4, 4))


def _attn(b, h, q, k, seed, key_mask=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, q, k, generator=g, dtype=torch.float64)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return scores.softmax(-1)


def test_attention_kl_matches_reference():
    a_s, a_t = _attn(2, 3, 4, 5, 0), _attn(2, 3, 4, 5, 1)
    expected = (a_t * (a_t / a_s).log()).sum(-1).mean()
    torch.testing.assert_close(attention_kl(a_s, a_t), expected)
    assert attention_kl(a_s, a_s.clone()).item() == 0.0


def test_attention_kl_masks_queries_and_padded_keys():
    key_mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    a_s, a_t = _attn(2, 3, 5, 5, 2, key_mask), _attn(2, 3, 5, 5, 3, key_mask)
    a_s.requires_grad_(True)
    per_row = (a_t * (a_t.clamp_min(1e-300) / a_s.detach().clamp_min(1e-300)).log()).sum(-1)
    value = attention_kl(a_s, a_t, mask=key_mask)  # padded query rows of example 0 do not count
    # mean over the 3 heads × 8 counted query positions, not over all 2×3×5 rows
    torch.testing.assert_close(value, per_row[key_mask[:, None, :].expand(2, 3, 5)].sum() / 24)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(a_s.grad).all()


def test_attention_kl_student_zero_is_finite():
    a_t = torch.tensor([[[[0.5, 0.5]]]])
    a_s = torch.tensor([[[[1.0, 0.0]]]], requires_grad=True)
    value = attention_kl(a_s, a_t)
    value.backward()
    assert torch.isfinite(value) and value > 10 and torch.isfinite(a_s.grad).all()


def test_hidden_mse_averages_over_counted_positions():
    h_s, h_t = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    per_position = ((h_s - h_t) ** 2).mean(-1)
    torch.testing.assert_close(hidden_mse(h_s, h_t, mask), per_position[mask].mean())
    torch.testing.assert_close(hidden_mse(h_s, h_t), ((h_s - h_t) ** 2).mean())
    assert hidden_mse(h_s, h_t, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="project"):
        hidden_mse(h_s, torch.randn(2, 4, 8))
