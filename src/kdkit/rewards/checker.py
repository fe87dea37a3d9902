"""Ground-truth rewards: a task's own checker grades each completion (uses the answer; for comparison)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kdkit.rewards.base import RewardInputs

Checker = Callable[[str, str], float]


def task_checker(task: str) -> Checker:
    """The checker `(prompt, completion) -> score` of a built-in task: "arithmetic" or "planning"."""
    if task == "arithmetic":
        from kdkit.tasks.arithmetic_judge import check_text

        return check_text
    if task == "planning":
        from kdkit.tasks.planning import check_text as check_plan

        return check_plan
    raise ValueError(f"no checker for task {task!r} (known: arithmetic, planning)")


class CheckerReward:
    """Reward = checker(prompt, completion), e.g. 1.0 for an exactly right answer, else 0.0.

    checker: a callable on the prompt and completion texts, or the name of a built-in task.
    """

    def __init__(self, checker: Checker | str) -> None:
        self.checker = task_checker(checker) if isinstance(checker, str) else checker

    def __call__(self, inputs: RewardInputs) -> Tensor:
        scores = [float(self.checker(p, c)) for p, c in zip(inputs.prompts, inputs.completions)]
        return torch.tensor(scores, dtype=torch.float32)


__all__ = ["Checker", "CheckerReward", "task_checker"]
