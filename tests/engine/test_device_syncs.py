"""The training loop does not wait for the GPU every step: loss terms, token counts and diagnostics
stay on the device until a log line (or the progress bar, at most once a second) reads them.

Reading a tensor on a GPU (`float(t)`, `.item()`, `.cpu()`) or creating one there from a Python
number makes the CPU wait until the GPU has finished every queued kernel, so the loop cannot queue
the next step's work while the GPU runs this one. On a machine without a GPU, "meta" tensors stand
in for device tensors: reading one raises, so code that never reads them passes. With a GPU, the
`cuda` tests count the synchronisations torch reports (`torch.cuda.set_sync_debug_mode`):
`pytest tests/engine/test_device_syncs.py -k cuda`.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from kdkit.engine import train
from kdkit.engine.metrics import LossWindow, _floats, _weighted, merge_windows
from kdkit.engine.trainer import TokenWeighting, _Progress
from tests.engine.tiny_lm import CompletionDataset, TokenKD, lm_config, make_models

META = torch.device("meta")
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]


def _fake_accelerator(device: torch.device) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1, device=device)


def test_recording_a_micro_batch_never_reads_device_values() -> None:
    window = LossWindow()
    losses = {"kd": torch.tensor(0.5, device=META), "_tokens": torch.tensor(7.0, device=META)}
    for _ in range(3):
        shown = window.add(losses, losses["kd"], 4, weight=losses["_tokens"])
    assert all(value.device == META for value in window.sums.values())
    assert window.counts["kd"].device == META
    assert window.counts["diag/tokens"] == 3.0  # diagnostics count once per micro-batch
    assert shown["kd"].device == META and window.examples == 12


def test_token_weighting_never_reads_a_device_count() -> None:
    weighting = TokenWeighting(_fake_accelerator(META), grad_accum_steps=1)
    state = _Progress(token_scale=4.0)  # fixed on the run's first micro-batch (the one read)
    losses = {"kd": torch.tensor(1.0, device=META), "_tokens": torch.tensor(8.0, device=META)}
    tokens = weighting.count(losses)
    assert tokens is not None and tokens.device == META
    assert weighting.weight(state, tokens).device == META
    model = torch.nn.Linear(3, 2, device=META)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    weighting.normalise(model, state, tokens + tokens)


def test_the_device_sums_give_the_float_sums() -> None:
    """The tensor path (GPU) and the float path (CPU) of a window agree, a token-less micro-batch
    (whose mean is NaN) included: it adds nothing."""
    values = [(0.25, 3.0), (float("nan"), 0.0), (1.5, 5.0)]
    as_floats = [_weighted(v, w) for v, w in values]
    as_tensors = [_weighted(torch.tensor(v), torch.tensor(w)) for v, w in values]
    assert as_floats[1] == 0.0 and float(as_tensors[1]) == 0.0
    read = _floats({i: t for i, t in enumerate(as_tensors)})
    assert [read[i] for i in range(3)] == pytest.approx(as_floats)
    assert _weighted(torch.tensor(2.0), 0.0).item() == 0.0 and _weighted(torch.tensor(2.0), 1.0).item() == 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_a_window_reads_the_same_means_on_every_device(device) -> None:
    window = LossWindow()
    for kd, tokens in [(0.25, 3.0), (float("nan"), 0.0), (1.5, 5.0)]:
        losses = {"kd": torch.tensor(kd, device=device), "_tokens": torch.tensor(tokens, device=device)}
        window.add(losses, losses["kd"], 2, weight=losses["_tokens"])
    means, examples = merge_windows([window.to_dict()])
    assert means["kd"] == pytest.approx((0.25 * 3 + 1.5 * 5) / 8) and means["loss"] == means["kd"]
    assert means["diag/tokens"] == pytest.approx(8 / 3) and examples == 6
    assert not any(math.isnan(v) for v in means.values())


@pytest.mark.parametrize("device", DEVICES)
def test_a_negative_token_count_is_refused_on_every_device(device) -> None:
    weighting = TokenWeighting(_fake_accelerator(torch.device(device)), grad_accum_steps=1)
    bad = {"kd": torch.tensor(1.0, device=device), "_tokens": torch.tensor(-2.0, device=device)}
    with pytest.raises(ValueError, match="_tokens"):
        weighting.count(bad)  # a CPU count: at once
        weighting.verify()  # a GPU count: at the next log line


def _syncs_while_training(tmp_path, steps: int) -> int:
    distiller = TokenKD(*make_models())
    cfg = lm_config(steps=steps, batch_size=8, log_every=1000, checkpoint_every=1000)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(distiller, CompletionDataset(), cfg, tmp_path / f"run-{steps}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@NO_GPU
def test_cuda_training_steps_do_not_wait_for_the_gpu(tmp_path) -> None:
    """Synchronisations happen at set-up, on the first micro-batch (the token scale) and at the
    log line and checkpoint, not per step: 12 steps cost no more of them than 3."""
    few, many = _syncs_while_training(tmp_path, 3), _syncs_while_training(tmp_path, 12)
    assert many - few <= 2, f"{few} synchronisations in 3 steps, {many} in 12"


@pytest.mark.parametrize("device", DEVICES)
def test_lm_diagnostics_known_on_the_host_stay_there(device) -> None:
    """Generation seconds and the on-policy flag are host numbers: returned as CPU tensors (creating
    them on a GPU would wait for it); the token count is computed on the batch's device."""
    from kdkit.config.lm import LMStudentRun
    from kdkit.pipelines.lm import build_distiller
    from kdkit.samplers.collate import PromptCompletionCollator
    from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

    tokenizer = arithmetic_tokenizer()
    sizes = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}
    teacher, student = (build_arithmetic_lm(tokenizer, **sizes, seed=seed) for seed in (1, 0))
    spec = LMStudentRun(name="s", method="gkd", lmbda=0.0)
    distiller = build_distiller(spec, student.to(device), teacher.eval().to(device), tokenizer)
    batch = PromptCompletionCollator(tokenizer)(arithmetic_dataset(4, (1, 2), seed=0))
    out = distiller({k: v.to(device) for k, v in batch.items()})
    assert out["_gen_s"].device.type == "cpu" and out["_on_policy"].device.type == "cpu"
    assert out["_tokens"].device.type == device and out["kd"].device.type == device
