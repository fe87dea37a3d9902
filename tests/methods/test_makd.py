"""MaKD distiller on tiny BERTs: taps, identical models score zero, weights, projection, training."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from kdkit.methods.makd_distiller import LOGIT_KD, SCRATCH, MaKDDistiller, MaKDParams
from kdkit.models.builders import derive_student, factorize
from kdkit.models.taps import block_module_names, transformer_features


def tiny_bert(layers: int = 4, hidden: int = 32, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
        num_labels=2,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config).eval()


def batch(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,), generator=g)}


def test_taps_find_attention_and_ffn_outputs_in_dense_and_factorised_models() -> None:
    teacher = tiny_bert()
    assert (
        block_module_names(teacher, ["attention.output.dense"])[1]
        == "bert.encoder.layer.1.attention.output.dense"
    )
    feats = transformer_features(teacher, batch(), attentions=True, module_outputs=True)
    assert len(feats.hidden_states) == 5 and len(feats.attentions) == 4 and len(feats.ffn_out) == 4
    assert feats.attentions[0].shape == (4, 4, 9, 9) and feats.ffn_out[2].shape == (4, 9, 32)
    assert not torch.allclose(feats.attention_out[0], feats.ffn_out[0])
    lowrank, _ = factorize(teacher, 0.5)
    low = transformer_features(lowrank, batch(), attentions=True, module_outputs=True)
    assert low.ffn_out[3].shape == feats.ffn_out[3].shape


def test_attention_kl_and_every_aspect_are_zero_for_identical_models() -> None:
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    distiller = MaKDDistiller(student, teacher, MaKDParams(ce_weight=0.0)).eval()
    out = distiller(batch())
    for term in ("kd", "attn_kl", "hidden_mse", "attn_out_mse", "ffn_out_mse"):
        assert float(out[term].detach()) == pytest.approx(0.0, abs=1e-9), term
    other = MaKDDistiller(tiny_bert(seed=1), teacher, MaKDParams(ce_weight=0.0)).eval()
    out = other(batch())
    assert all(
        float(out[t].detach()) > 1e-6 for t in ("kd", "attn_kl", "hidden_mse", "attn_out_mse", "ffn_out_mse")
    )


def test_terms_are_weighted_and_logged_raw() -> None:
    teacher = tiny_bert()
    params = MaKDParams(attn_weight=3.0, hidden_weight=0.5, ffn_out_weight=0.0, ce_weight=2.0)
    distiller = MaKDDistiller(tiny_bert(seed=1), teacher, params).eval()
    out = distiller(batch())
    assert "ffn_out_mse" not in out and "attn_out_mse" in out
    torch.testing.assert_close(out["attn_kl"], 3.0 * out["_raw_attn_kl"])
    torch.testing.assert_close(out["hidden_mse"], 0.5 * out["_raw_hidden_mse"])
    torch.testing.assert_close(out["ce"], 2.0 * out["_raw_ce"])
    assert set(MaKDDistiller(tiny_bert(seed=1), teacher, MaKDParams(**LOGIT_KD))(batch())) == {
        "ce",
        "kd",
        "_raw_ce",
        "_raw_kd",
    }
    scratch = MaKDDistiller(tiny_bert(seed=1), None, MaKDParams(**SCRATCH))
    assert set(scratch(batch())) == {"ce", "_raw_ce"}
    with pytest.raises(ValueError, match="needs a teacher"):
        MaKDDistiller(tiny_bert(seed=1), None, MaKDParams())


def test_layer_selected_student_with_a_narrower_width_trains_through_a_projection() -> None:
    teacher = tiny_bert(layers=4)
    narrow = tiny_bert(layers=2, hidden=16, seed=2)
    distiller = MaKDDistiller(narrow, teacher, MaKDParams(layer_mapping=[1, 3]))
    assert distiller.pairs == [(0, 1), (1, 3)] and isinstance(distiller.projection, torch.nn.Linear)
    optimizer = torch.optim.Adam(distiller.parameters(), lr=3e-3)
    fixed = batch()
    first = None
    for _ in range(25):
        out = distiller.train()(fixed)
        loss = sum(v for k, v in out.items() if not k.startswith("_"))
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.7 * first
    assert distiller.projection.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never trains


def test_layer_selected_student_starts_close_on_the_matched_layers() -> None:
    teacher = tiny_bert(layers=4)
    student = derive_student(teacher, keep_layers=[0, 1])
    out = MaKDDistiller(student, teacher, MaKDParams(layer_mapping=[0, 1])).eval()(batch())
    # the first two layers are copies: their features match exactly
    assert float(out["_raw_attn_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["_raw_hidden_mse"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["_raw_kd"]) > 0  # but the logits differ (two layers are missing)


def test_makd_is_a_registered_method_with_checked_parameters() -> None:
    from kdkit.registry import METHODS, load_builtins
    from kdkit.settings import ConfigError

    load_builtins()
    method = METHODS.get("makd")
    assert method.kind == "classifier"
    params = method.params({"attn_weight": 2.0, "layer_mapping": "last:2"})
    distiller = method.distiller(params, tiny_bert(layers=4, seed=1), tiny_bert(layers=4))
    assert distiller.pairs == [(2, 2), (3, 3)] and distiller.params.attn_weight == 2.0
    with pytest.raises(ValueError, match="attn_wieght"):
        method.params({"attn_wieght": 2.0})
    with pytest.raises(ConfigError, match="transformer"):
        method.objectives(params)


def test_student_attention_rows_stay_distributions_while_training() -> None:
    teacher = tiny_bert()
    student = copy.deepcopy(teacher).train()
    student.config.attention_probs_dropout_prob = 0.5
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    noisy = transformer_features(student, batch(), attentions=True).attentions[0].sum(-1)
    assert not torch.allclose(noisy, torch.ones_like(noisy))  # dropout breaks the rows
    MaKDDistiller(student, teacher, MaKDParams())  # switches attention dropout off
    rows = transformer_features(student.train(), batch(), attentions=True).attentions[0].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))
