"""The planning task: scenarios, the expert planner, plan execution, checker and metrics."""

from __future__ import annotations

import pytest

from kdkit.tasks.arithmetic import build_arithmetic_lm
from kdkit.tasks.planning import (
    DIFFICULTIES,
    Scenario,
    check_text,
    execute,
    expert_plan,
    make_scenarios,
    parse_prompt,
    plan_metrics,
    planning_tokenizer,
)


def test_expert_plan_is_shortest_and_avoids_obstacles() -> None:
    scenario = Scenario(("....", ".##.", "....", "...."), start=(0, 1), goal=(2, 2), difficulty="easy")
    plan = expert_plan(scenario)
    assert plan is not None and len(plan) == 5  # around the wall: manhattan distance 3 + detour 2
    assert execute(scenario, plan).success
    assert execute(scenario, "DD").collision  # straight down hits the wall
    assert execute(scenario, "UU").off_grid
    assert execute(scenario, "RX").invalid
    stopped = execute(scenario, "R")
    assert not (stopped.success or stopped.collision or stopped.off_grid or stopped.invalid)
    walled = Scenario(("..#.", "..#.", "..#.", "..#."), (0, 0), (0, 3), "easy")
    assert expert_plan(walled) is None


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_generated_scenarios_are_solvable_and_round_trip_through_text(difficulty: str) -> None:
    for scenario in make_scenarios(60, (difficulty,), seed=1):
        assert scenario.size == DIFFICULTIES[difficulty][0]
        assert check_text(scenario.prompt, scenario.completion) == 1.0
        parsed = parse_prompt(scenario.prompt)
        assert (parsed.grid, parsed.start, parsed.goal, parsed.difficulty) == (
            scenario.grid,
            scenario.start,
            scenario.goal,
            scenario.difficulty,
        )
        assert scenario.grid[scenario.start[0]][scenario.start[1]] == "."


def test_tokenizer_round_trips_prompts_and_plans() -> None:
    tokenizer = planning_tokenizer()
    scenario = make_scenarios(1, ("hard",), seed=2)[0]
    text = scenario.prompt + scenario.completion
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_plan_metrics_of_an_untrained_policy_are_rates_by_difficulty() -> None:
    tokenizer = planning_tokenizer()
    model = build_arithmetic_lm(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    scenarios = make_scenarios(12, ("easy", "ood"), seed=0)
    metrics = plan_metrics(model, tokenizer, scenarios, batch_size=5)
    assert set(metrics) == {"easy", "ood"}
    for row in metrics.values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
        assert row["success"] + row["collision"] + row["off_grid"] + row["invalid"] <= 1.0 + 1e-9


def test_planning_teacher_is_trained_once_then_cached(kdkit_cache, monkeypatch) -> None:
    import json

    from kdkit.pipelines import teachers
    from kdkit.pipelines.planning_teacher import PlanningTeacherConfig, get_planning_teacher

    config = PlanningTeacherConfig(
        hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, steps=2, batch_size=4
    )
    _, _, folder = get_planning_teacher(config, progress=False)
    info = json.loads((folder / "kdkit_teacher.json").read_text())
    assert set(info["metrics_by_difficulty"]) == set(DIFFICULTIES)
    monkeypatch.setattr(
        teachers, "train_causal_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    )
    assert get_planning_teacher(config)[2] == folder
