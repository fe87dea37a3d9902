"""Ground-truth rewards: a task's own checker grades each completion (uses the answer; for comparison)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdkit.registry import REWARDS, Param
from kdkit.rewards.base import RewardInputs
from kdkit.tasks.arithmetic_judge import check_text as arithmetic_check
from kdkit.tasks.planning import check_text as planning_check

Checker = Callable[[str, str], float]
TASKS = ("arithmetic", "planning")


def task_checker(task: str) -> Checker:
    """The checker `(prompt, completion) -> score` of a built-in task: "arithmetic" or "planning"."""
    if task == "arithmetic":
        return arithmetic_check
    if task == "planning":
        return planning_check
    raise ValueError(f"no checker for task {task!r} (known: {', '.join(TASKS)})")


@REWARDS.register(
    "checker",
    "the task's checker: 1 for a right answer, else 0 (reads the answer: the ground-truth reward)",
    params={"task": Param("the built-in task whose checker grades", choices=TASKS)},
)
class CheckerReward:
    """Reward = checker(prompt, completion), e.g. 1.0 for an exactly right answer, else 0.0.

    task: the built-in task whose checker grades ("arithmetic", "planning"); or give `checker`, any
    callable on the prompt and completion texts.
    """

    needs_teacher = False

    def __init__(self, task: str = "arithmetic", *, checker: Checker | None = None) -> None:
        self.checker = checker if checker is not None else task_checker(task)

    def __call__(self, inputs: RewardInputs) -> Tensor:
        scores = [float(self.checker(p, c)) for p, c in zip(inputs.prompts, inputs.completions)]
        return torch.tensor(scores, dtype=torch.float32)


__all__ = ["Checker", "CheckerReward", "task_checker"]
