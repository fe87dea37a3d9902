"""MaKD pure terms: layer mapping and the multi-aspect terms on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from kdkit.losses.features import attention_kl
from kdkit.losses.makd import layer_pairs, multi_aspect_terms


def test_layer_pairs_strategies() -> None:
    assert layer_pairs(2, 6) == [(0, 2), (1, 5)]  # TinyBERT's g(m) = 3m
    assert layer_pairs(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert layer_pairs(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_pairs(4, 6, "last:2") == [(2, 4), (3, 5)]
    assert layer_pairs(2, 6, [0, -1]) == [(0, 0), (1, 5)]
    assert layer_pairs(2, 6, [[1, 3]]) == [(1, 3)]
    with pytest.raises(ValueError, match="one per layer"):
        layer_pairs(2, 6, [0, 1, 2])
    with pytest.raises(ValueError, match="out of range"):
        layer_pairs(2, 6, [0, 6])
    with pytest.raises(ValueError, match="K must be"):
        layer_pairs(2, 6, "last:3")
    with pytest.raises(ValueError, match="uniform"):
        layer_pairs(2, 6, "every")


def _features(layers: int, seed: int) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    b, h, t, d = 2, 3, 5, 8
    return {
        "attentions": [torch.randn(b, h, t, t, generator=g).softmax(-1) for _ in range(layers)],
        "hidden_states": [torch.randn(b, t, d, generator=g) for _ in range(layers + 1)],
        "attention_out": [torch.randn(b, t, d, generator=g) for _ in range(layers)],
        "ffn_out": [torch.randn(b, t, d, generator=g) for _ in range(layers)],
    }


def test_terms_are_zero_for_identical_features_and_follow_the_pairs() -> None:
    teacher = _features(4, seed=0)
    same = multi_aspect_terms(teacher, teacher, layer_pairs(4, 4))
    assert set(same) == {"attn_kl", "hidden_mse", "attn_out_mse", "ffn_out_mse"}
    assert all(float(v) == pytest.approx(0.0, abs=1e-7) for v in same.values())

    student = _features(2, seed=1)
    pairs = [(0, 1), (1, 3)]
    terms = multi_aspect_terms(student, teacher, pairs, match_embeddings=False)
    expected_kl = (
        attention_kl(student["attentions"][0], teacher["attentions"][1])
        + attention_kl(student["attentions"][1], teacher["attentions"][3])
    ) / 2
    torch.testing.assert_close(terms["attn_kl"], expected_kl)
    expected_hidden = (
        (student["hidden_states"][1] - teacher["hidden_states"][2]).square().mean()
        + (student["hidden_states"][2] - teacher["hidden_states"][4]).square().mean()
    ) / 2
    torch.testing.assert_close(terms["hidden_mse"], expected_hidden)
    # a student whose matched layers copy the teacher's scores zero even if other layers differ
    # (hidden_states[0] is the embedding output, so layer t's output is hidden_states[t + 1])
    copied = {k: [v[i] for i in ([0, 2, 4] if k == "hidden_states" else [1, 3])] for k, v in teacher.items()}
    zero = multi_aspect_terms(copied, teacher, pairs)
    assert all(float(v) == pytest.approx(0.0, abs=1e-7) for v in zero.values())


def test_padding_positions_never_count() -> None:
    teacher = _features(1, seed=0)
    student = {k: [x.clone() for x in v] for k, v in teacher.items()}
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    for key in ("hidden_states", "attention_out", "ffn_out"):
        for x in student[key]:
            x[:, 3:] += 100.0  # garbage at padding only
    student["attentions"][0][:, :, 3:] = torch.full((5,), 0.2)
    terms = multi_aspect_terms(student, teacher, [(0, 0)], mask=mask)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in terms.values())
    with pytest.raises(ValueError, match="unknown MaKD aspect"):
        multi_aspect_terms(student, teacher, [(0, 0)], aspects=["attn"])
