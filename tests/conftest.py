"""Shared test settings: deterministic, small, offline."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def kdkit_cache(tmp_path, monkeypatch):
    """An isolated KDKIT_CACHE for tests that write caches."""
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
