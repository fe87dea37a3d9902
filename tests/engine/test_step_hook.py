"""The engine announces each optimizer step to the distiller (`on_step(step)`, 0-based, before the
step's micro-batches, continued from the checkpoint on resume), so schedules inside a loss count
optimizer steps: DKD's warm-up with grad_accum_steps=4 reaches 1 after warmup_steps optimizer
steps, not after warmup_steps micro-batches."""

import pytest
import torch
from torch import nn

from kdkit.engine import train
from kdkit.methods import ClassifierDistiller
from kdkit.objectives.classifier import DKDTerm
from tests.engine.tiny_run import TinyDataset, TinyKD, make_models, tiny_config


class Recorder(nn.Module):
    """A submodule with a step hook, as an objective term with a schedule would have."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def on_step(self, step: int) -> None:
        self.events.append(("hook", step))


class Announced(TinyKD):
    """TinyKD that records, in order, the steps announced to its submodule and each forward call
    with the distiller's `global_step` at that time."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.events: list = []
        self.recorder = Recorder(self.events)

    def forward(self, batch):
        self.events.append(("forward", self.global_step))
        return super().forward(batch)


def test_each_optimizer_step_is_announced_before_its_micro_batches(tmp_path):
    distiller = Announced(*make_models())
    train(distiller, TinyDataset(), tiny_config(steps=3, batch_size=4, grad_accum_steps=3), tmp_path)
    expected = []
    for step in range(3):
        expected += [("hook", step)] + [("forward", step)] * 3
    assert distiller.events == expected


def test_a_resumed_run_announces_steps_from_the_checkpoint(tmp_path):
    cfg = tiny_config(steps=6, batch_size=4, grad_accum_steps=2, checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train(Announced(*make_models(), fail_after=9), TinyDataset(), cfg, tmp_path)  # dies in step 5
    resumed = Announced(*make_models())
    train(resumed, TinyDataset(), cfg, tmp_path, resume=True)
    assert [step for kind, step in resumed.events if kind == "hook"] == [3, 4, 5]
    assert resumed.events[1] == ("forward", 3)


def test_dkd_warmup_counts_optimizer_steps_not_micro_batches(tmp_path):
    student, teacher = make_models(dropout=0.0)
    distiller = ClassifierDistiller(student, teacher, [{"name": "dkd", "warmup_steps": 3, "beta": 2.0}])
    term = distiller.terms[0]
    unramped = DKDTerm(term.params.model_copy(update={"warmup_steps": 0}))
    ramps = []
    original = term.terms

    def observed(out):
        result = original(out)
        full = unramped.terms(out)["dkd_nontarget"].detach()
        ramps.append(float(result["dkd_nontarget"].detach() / full))
        return result

    term.terms = observed
    train(distiller, TinyDataset(), tiny_config(steps=4, batch_size=4, grad_accum_steps=4), tmp_path)
    # (step + 1) / 3 for the four micro-batches of each step: full strength from the 3rd step on
    expected = [1 / 3] * 4 + [2 / 3] * 4 + [1.0] * 8
    assert ramps == pytest.approx(expected, rel=1e-5)


def test_dkd_warmup_without_the_hook_is_a_clear_error():
    student, teacher = make_models(dropout=0.0)
    distiller = ClassifierDistiller(student, teacher, [{"name": "dkd", "warmup_steps": 3}]).train()
    batch = TinyDataset()[0:4]
    with pytest.raises(RuntimeError, match=r"on_step\(step\)"):
        distiller(batch)
    distiller.on_step(0)
    assert torch.isfinite(distiller(batch)["dkd_target"])
