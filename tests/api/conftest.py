"""Tiny teachers, students and data for the front-door tests (seconds on a CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class Teacher(nn.Module):
    """A fixed, decisive linear teacher over 12 features and 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.linear = nn.Linear(12, 4)
        with torch.no_grad():
            self.linear.weight.copy_(3 * torch.randn(4, 12, generator=generator))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def make_student(width: int = 4, inputs: int = 12) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, width))


@pytest.fixture
def teacher() -> nn.Module:
    return Teacher().eval()


@pytest.fixture
def tensors(teacher):
    """(X_train, y_train, X_test, y_test): labels are the teacher's predictions (it is 100% right)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1200, 12, generator=generator)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return x[:900], y[:900], x[900:], y[900:]


def agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())


FAST = {"steps": 60, "batch_size": 64, "lr": 1e-2, "progress": False, "log_every": 20}
