"""fp16 loss scaling: a step the scaler skips (inf/NaN gradients) leaves the weights *and* the lr
schedule where they were, and the scaler's state is checkpointed so a resumed run matches.

Accelerate 1.15 creates no GradScaler on a CPU (fp16 there silently trains in float32), so these
tests give a CPU accelerator what it gives a GPU one: fp16 autocast (`native_amp`) and a
`torch.amp.GradScaler("cpu")`. The engine code they exercise is the same as on a GPU.
"""

import json

import pytest
import torch

from kdkit.engine import train, trainer
from kdkit.engine.checkpoint import list_checkpoints
from tests.engine.tiny_run import TinyDataset, TinyKD, make_models, tiny_config

INIT_SCALE = 2.0**10


@pytest.fixture
def cpu_fp16(monkeypatch):
    """make_accelerator for fp16 runs on a CPU, with autocast and a loss scaler like a GPU's."""
    original = trainer.make_accelerator

    def with_scaler(cfg):
        accelerator = original(cfg)
        if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
            accelerator.native_amp = True
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=3)
        return accelerator

    monkeypatch.setattr(trainer, "make_accelerator", with_scaler)


class Overflowing(TinyKD):
    """TinyKD whose loss is infinite on the forward calls in `poisoned` (1-based), so every
    gradient of that step is inf/NaN and the scaler skips it."""

    def __init__(self, *args, poisoned=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned = set(poisoned)

    def forward(self, batch):
        losses = super().forward(batch)
        if self.calls in self.poisoned:
            losses["kd"] = losses["kd"] * float("inf")
        return losses


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(distiller):
    return {k: v.detach().clone() for k, v in distiller.student.state_dict().items()}


def scaler_state(run_dir):
    return json.loads((list_checkpoints(run_dir)[-1] / "scaler.json").read_text())


def test_a_skipped_step_does_not_advance_the_lr_schedule(tmp_path, cpu_fp16):
    cfg = tiny_config(steps=6, warmup_steps=3, lr=0.01, schedule="constant", mixed_precision="fp16",
                      checkpoint_every=100, max_grad_norm=1.0)
    distiller = Overflowing(*make_models(), poisoned={2})
    train(distiller, TinyDataset(), cfg, tmp_path)
    lrs = [record["lr"] for record in history(tmp_path)]
    # warm-up (step + 1) / 4 of 0.01; step 2 was skipped, so step 3 runs at step 2's lr
    assert lrs == pytest.approx([0.0025, 0.005, 0.005, 0.0075, 0.01, 0.01])
    state = scaler_state(tmp_path)
    # backed off once (×0.5) at the skip, then grew ×2 after 3 clean steps (growth_interval 3)
    assert state["scale"] == INIT_SCALE and state["_growth_tracker"] == 1


def test_a_skipped_step_leaves_the_weights_unchanged(tmp_path, cpu_fp16):
    runs = {}
    for name, steps, poisoned in [("skipped", 2, {2}), ("one_step", 1, set())]:
        distiller = Overflowing(*make_models(), poisoned=poisoned)
        cfg = tiny_config(steps=steps, mixed_precision="fp16", checkpoint_every=100)
        train(distiller, TinyDataset(), cfg, tmp_path / name)
        runs[name] = weights(distiller)
    for key, value in runs["one_step"].items():
        assert torch.equal(runs["skipped"][key], value), key
    assert scaler_state(tmp_path / "skipped")["scale"] == INIT_SCALE / 2


def test_resume_restores_the_loss_scaler(tmp_path, cpu_fp16):
    """Crash in step 7 and resume from the step-5 checkpoint: the scale (backed off at steps 2
    and 3, then growing after every 3 clean steps) and so the fp16 rounding of every later step
    match the uninterrupted run."""
    cfg = tiny_config(steps=10, checkpoint_every=5, log_every=1, mixed_precision="fp16")
    reference = Overflowing(*make_models(), poisoned={2, 3})
    train(reference, TinyDataset(), cfg, tmp_path / "reference")
    crashed = Overflowing(*make_models(), poisoned={2, 3}, fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, TinyDataset(), cfg, tmp_path / "run")
    saved = json.loads((list_checkpoints(tmp_path / "run")[-1] / "scaler.json").read_text())
    assert saved["scale"] == INIT_SCALE / 4 and saved["_growth_tracker"] == 2  # grows at step 6

    resumed = Overflowing(*make_models(), poisoned=set())  # calls restart at 0: no poison after resume
    result = train(resumed, TinyDataset(), cfg, tmp_path / "run", resume=True)
    assert result.resumed_from == 5
    assert scaler_state(tmp_path / "run") == scaler_state(tmp_path / "reference")
    for key, value in weights(reference).items():
        assert torch.equal(weights(resumed)[key], value), key
    drop = ("elapsed_s", "examples_per_s")
    strip = lambda records: [{k: v for k, v in r.items() if k not in drop} for r in records]  # noqa: E731
    assert strip(history(tmp_path / "run")) == strip(history(tmp_path / "reference"))


def test_fp16_on_a_cpu_says_it_trains_in_float32(tmp_path, caplog):
    if torch.cuda.is_available():
        pytest.skip("a GPU gets real fp16")
    with caplog.at_level("WARNING", logger="kdkit"):
        train(TinyKD(*make_models()), TinyDataset(), tiny_config(steps=1, mixed_precision="fp16"), tmp_path)
    assert "float32" in caplog.text
    assert not (list_checkpoints(tmp_path)[-1] / "scaler.json").exists()
