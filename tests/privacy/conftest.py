import pytest
import torch

from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def tokenizer():
    return arithmetic_tokenizer()


@pytest.fixture
def tiny_lm(tokenizer):
    def build(seed: int = 0) -> torch.nn.Module:
        return build_arithmetic_lm(tokenizer, seed=seed, **TINY)

    return build


@pytest.fixture(scope="module")
def records():
    return arithmetic_dataset(48, (1, 2), seed=3)
