"""Rewards for RL-based distillation (`REWARDS`): a judge's verdict, a task checker, the teacher's
log-likelihood. Each entry is a class called on `RewardInputs` (prompts, completions, the token
batch, the teacher) and returning one float per completion; its keyword parameters are declared
when it is registered, so a config writes them flat beside the reward's name
(`reward: judge, judge: arithmetic, output: log_odds`). Importing this package registers them.
"""

from kdkit.rewards.base import Reward, RewardInputs
from kdkit.rewards.checker import CheckerReward, task_checker
from kdkit.rewards.judge import JUDGE_OUTPUTS, JudgeReward
from kdkit.rewards.teacher import TeacherLogLikelihoodReward, teacher_token_log_probs

__all__ = [
    "JUDGE_OUTPUTS",
    "CheckerReward",
    "JudgeReward",
    "Reward",
    "RewardInputs",
    "TeacherLogLikelihoodReward",
    "task_checker",
    "teacher_token_log_probs",
]
