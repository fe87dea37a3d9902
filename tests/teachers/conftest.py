"""Fixtures: a tiny real LM and the project's own OpenAI-compatible server around it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.teachers.server import TinyLMServer, tiny_arithmetic_lm


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[Any, Any]:
    return tiny_arithmetic_lm(seed=0)


@pytest.fixture
def server(tiny_lm: tuple[Any, Any]) -> Iterator[TinyLMServer]:
    model, tokenizer = tiny_lm
    with TinyLMServer(model, tokenizer, fault_delay_s=1.0) as running:
        yield running
