"""The audit separates a DP student from a non-private one trained the same way (slow: ~1 min)."""

import pytest

from kdkit.engine.private import PrivacyConfig, train_private
from kdkit.engine.settings import TrainConfig
from kdkit.methods.private_distiller import PrivateLMDistiller
from kdkit.privacy.audit import audit, insert_canaries, make_canaries
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.tasks.arithmetic import arithmetic_dataset, build_arithmetic_lm


@pytest.mark.slow
def test_dp_student_leaks_less_than_the_non_private_one(tokenizer, tmp_path):
    def text(rows):
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]

    records = text(arithmetic_dataset(60, (1, 2), seed=1))
    canaries = make_canaries(3, copies=5, secret_length=2, seed=2)
    private = insert_canaries(records, canaries, seed=0)
    non_members = text(arithmetic_dataset(60, (1, 2), seed=9))
    found = {}
    for name, privacy in {"non_private": PrivacyConfig(noise_multiplier=0.0, max_grad_norm=1e6),
                          "dp": PrivacyConfig(target_epsilon=1.0, max_grad_norm=1.0)}.items():
        student = build_arithmetic_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                      intermediate_size=64, seed=0)
        cfg = TrainConfig(steps=100, batch_size=16, lr=1e-2, schedule="constant", log_every=40,
                          checkpoint_every=100, progress=False, mixed_precision="no")
        train_private(PrivateLMDistiller(student, None, mode="ft"), private, cfg, privacy, tmp_path / name,
                      collate_fn=PromptCompletionCollator(tokenizer))
        found[name] = audit(student, tokenizer, canaries, records, non_members)
    assert found["non_private"]["exposure_mean"] > 4.0  # of log2(100) = 6.6 bits: memorised
    assert found["dp"]["exposure_mean"] < found["non_private"]["exposure_mean"] - 2.0
    assert found["dp"]["mia_auc"] < found["non_private"]["mia_auc"]
