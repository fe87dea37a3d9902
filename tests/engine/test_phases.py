"""The named phases of a training step (`kdkit.engine.phases`): every phase of an LM step is marked,
once per step, in step order, for profilers (record_function ranges) and for `PhaseTimer`."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kdkit.config.lm import LMStudentRun
from kdkit.engine import TrainConfig, train
from kdkit.engine.phases import STEP_PHASES, PhaseTimer, phase
from kdkit.pipelines.lm import build_distiller
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm


def _run(tmp_path, lmbda: float, steps: int = 3):
    tokenizer = arithmetic_tokenizer()
    teacher = build_arithmetic_lm(
        tokenizer, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, seed=1
    )
    student = build_arithmetic_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0
    )
    spec = LMStudentRun(name="s", method="gkd", lmbda=lmbda, max_new_tokens=6)
    distiller = build_distiller(spec, student, teacher.eval(), tokenizer)
    cfg = TrainConfig(
        steps=steps, batch_size=4, lr=1e-3, log_every=steps, checkpoint_every=steps, progress=False
    )
    samples = arithmetic_dataset(16, (1, 2), seed=0)
    with PhaseTimer() as timer:
        train(distiller, samples, cfg, tmp_path, collate_fn=PromptCompletionCollator(tokenizer))
    return timer


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_every_phase_of_each_step_is_timed_in_order(tmp_path, lmbda) -> None:
    timer = _run(tmp_path, lmbda)
    steps = timer.steps()
    assert len(steps) == 3
    for step in steps:
        assert set(step) == {*STEP_PHASES, "step"}
        assert all(seconds >= 0 for seconds in step.values())
        # the student's forward pass runs inside the loss phase; top-level phases fit in the step
        assert step["student_forward"] <= step["loss"]
        top = sum(step[name] for name in STEP_PHASES if name != "student_forward")
        assert top <= step["step"] + 1e-6
    names = [name for name, _, _ in timer.spans]
    # spans are recorded as they end: the nested student_forward before the loss phase around it
    assert names[: names.index("optimizer") + 1] == [
        "data",
        "sample",
        "teacher",
        "student_forward",
        "loss",
        "backward",
        "optimizer",
    ]


def _matmuls_inside_sample_ranges(tmp_path, lmbda: float) -> int:
    """Matrix multiplies the profiler saw inside `kdkit.sample` ranges of a 2-step run."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _run(tmp_path, lmbda, steps=2)
    events = prof.events()
    ranges = [e.time_range for e in events if e.name == "kdkit.sample"]
    assert len(ranges) == 2  # one per step, on- or off-policy
    matmuls = [e.time_range for e in events if e.name in ("aten::mm", "aten::addmm", "aten::bmm")]
    return sum(any(r.start <= m.start and m.end <= r.end for r in ranges) for m in matmuls)


def test_generation_runs_inside_the_sample_phase_only_on_policy(tmp_path) -> None:
    # an off-policy sampler passes the batch through; an on-policy one runs the student's decode loop
    assert _matmuls_inside_sample_ranges(tmp_path / "off", 0.0) == 0
    assert _matmuls_inside_sample_ranges(tmp_path / "on", 1.0) > 0


def test_phases_are_profiler_ranges() -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof, phase("teacher"):
        torch.ones(4).sum()
    assert "kdkit.teacher" in {event.name for event in prof.events()}


def test_unknown_phase_and_nested_timers_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown step phase 'techer'"), phase("techer"):
        pass
    with PhaseTimer(), pytest.raises(RuntimeError, match="already active"), PhaseTimer():
        pass
