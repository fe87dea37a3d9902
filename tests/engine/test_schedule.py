"""Learning-rate schedule and optimizer construction."""

import copy
import math

import pytest
import torch
from torch import nn

from kdkit.config import ConfigError
from kdkit.engine.schedule import build_optimizer, build_scheduler, lr_multiplier
from tests.engine.tiny_run import tiny_config


def test_warmup_is_linear_and_never_zero():
    values = [lr_multiplier(s, total_steps=10, warmup_steps=3, schedule="cosine") for s in range(4)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_after_warmup_matches_formula():
    total, warmup = 10, 2
    for step in range(warmup, total):
        expected = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        got = lr_multiplier(step, total_steps=total, warmup_steps=warmup, schedule="cosine")
        assert got == pytest.approx(expected)
    last = lr_multiplier(total - 1, total_steps=total, warmup_steps=warmup, schedule="cosine")
    assert 0 < last < 0.05


def test_constant_with_warmup():
    values = [lr_multiplier(s, total_steps=6, warmup_steps=1, schedule="constant") for s in range(6)]
    assert values == pytest.approx([0.5, 1, 1, 1, 1, 1])


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="linear"):
        lr_multiplier(5, total_steps=10, warmup_steps=0, schedule="linear")


def test_scheduler_sets_optimizer_lr_per_step(tmp_path):
    model = nn.Linear(2, 2)
    cfg = tiny_config(steps=5, warmup_steps=1, lr=0.1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.1 * lr_multiplier(s, total_steps=5, warmup_steps=1, schedule="cosine") for s in range(5)]
    assert seen == pytest.approx(expected)
    # the state holds only numbers, so it reloads under weights_only into a fresh scheduler
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    fresh = build_scheduler(build_optimizer(model, cfg), cfg)
    fresh.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert fresh.last_epoch == 5 and fresh.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_optimizer_skips_frozen_parameters_and_picks_sgd():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, tiny_config(optimizer="sgd", momentum=0.5))
    assert isinstance(optimizer, torch.optim.SGD)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 2 and all(p.requires_grad for p in params)
    assert optimizer.param_groups[0]["momentum"] == 0.5


def test_no_trainable_parameters_is_a_clear_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, tiny_config())


def test_the_fused_adamw_step_is_adamw():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    models = {fused: copy.deepcopy(reference) for fused in (False, True)}
    cfg = tiny_config(lr=0.05, weight_decay=0.1)
    optimizers = {fused: build_optimizer(model, cfg, fused=fused) for fused, model in models.items()}
    assert optimizers[True].defaults["fused"] and not optimizers[False].defaults["fused"]
    x = torch.randn(16, 4)
    for _ in range(5):
        for fused, model in models.items():
            optimizers[fused].zero_grad()
            model(x).square().mean().backward()
            optimizers[fused].step()
    for (name, a), b in zip(models[False].named_parameters(), models[True].parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
