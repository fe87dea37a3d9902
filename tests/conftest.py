"""Shared test settings: deterministic, small, offline."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests use tiny tensors, where a second intra-op thread costs far more than it saves (10x slower
# on a loaded 2-core machine); subprocesses the tests start inherit this through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# The fused loss compiles its chunk math by default on CUDA for 16-bit inputs (tens of seconds per
# combination): tests run it eagerly unless they test the compiled form (they set it themselves).
os.environ.setdefault("KDKIT_FUSED_COMPILE", "0")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def kdkit_cache(tmp_path, monkeypatch):
    """An isolated KDKIT_CACHE for tests that write caches."""
    monkeypatch.setenv("KDKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
