"""Rewards for RL-based distillation: a judge's verdict, a task checker, the teacher's log-likelihood.

`REWARDS` names each reward class for configs. (It moves to `kdkit.registry.REWARDS` when the
composable core lands; this module then registers into that one.)
"""

from kdkit.losses.registry import Registry
from kdkit.rewards.base import Reward, RewardInputs
from kdkit.rewards.checker import CheckerReward, task_checker
from kdkit.rewards.judge import JUDGE_OUTPUTS, JudgeReward
from kdkit.rewards.teacher import TeacherLogLikelihoodReward, teacher_token_log_probs

REWARDS: Registry[type] = Registry("reward")
REWARDS.add("judge", JudgeReward, "a judge LM's probability (or log-odds) of 'yes' after a grading template")
REWARDS.add("checker", CheckerReward, "the task's checker: 1 for a right answer, else 0 (uses the answer)")
REWARDS.add("teacher_loglik", TeacherLogLikelihoodReward, "the teacher's log-likelihood of the sample")

__all__ = [
    "JUDGE_OUTPUTS",
    "REWARDS",
    "CheckerReward",
    "JudgeReward",
    "Reward",
    "RewardInputs",
    "TeacherLogLikelihoodReward",
    "task_checker",
    "teacher_token_log_probs",
]
