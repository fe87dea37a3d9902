"""Checkpoint files: atomic publication, leftovers of a killed write, RNG round trip."""

import random

import numpy as np
import torch

from kdkit.engine import train
from kdkit.engine.checkpoint import capture_rng, latest_checkpoint, list_checkpoints, restore_rng
from tests.engine.tiny_run import TinyDataset, TinyKD, make_models, tiny_config


def test_rng_round_trip_restores_every_stream(tmp_path):
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every stream on
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path):
    train(TinyKD(*make_models()), TinyDataset(), tiny_config(steps=5, checkpoint_every=5), tmp_path)
    root = tmp_path / "checkpoints"
    # what a kill can leave: a temp folder mid-write, a trash folder mid-delete, a folder with no state.json
    (root / ".tmp_step_0000010").mkdir()
    (root / ".tmp_step_0000010" / "model.safetensors").write_bytes(b"partial")
    (root / ".trash_step_0000001").mkdir()
    (root / "step_0000009").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_0000005"

    result = train(TinyKD(*make_models()), TinyDataset(), tiny_config(steps=7, checkpoint_every=5), tmp_path,
                   resume=True)
    assert result.resumed_from == 5 and result.steps == 7
    names = sorted(p.name for p in root.iterdir())
    assert not any(name.startswith((".tmp_", ".trash_")) for name in names)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_0000007"]
