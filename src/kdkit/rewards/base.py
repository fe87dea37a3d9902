"""What a reward function sees, and the shape of its answer.

A reward scores each sampled completion with one number (GRPO's group advantages are built from
these), and may also give a per-token reward (REINFORCE with the teacher's log-likelihood).
Rewards read text (prompts and completions decoded with the student's tokenizer) and, when they
need them, the token batch and the frozen teacher; none of them sees a ground-truth label unless it
says so (`CheckerReward` grades with the task's checker, which knows the answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn


@dataclass
class RewardInputs:
    """One batch of sampled completions, as text and as tokens.

    prompts, completions: B strings each (the completion up to, not including, EOS).
    batch: the training batch the completions came from: input_ids / attention_mask / labels [B, T]
        (labels = the completion tokens, EOS included, -100 elsewhere); may be empty for text-only
        rewards.
    teacher: the frozen teacher LM (None when the method has none).
    """

    prompts: list[str]
    completions: list[str]
    batch: dict[str, Any] = field(default_factory=dict)
    teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.completions):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.completions)} completions")


class Reward(Protocol):
    """A sequence-level reward: `reward(inputs) -> [B] float tensor` (no gradient)."""

    def __call__(self, inputs: RewardInputs) -> Tensor: ...


__all__ = ["Reward", "RewardInputs"]
