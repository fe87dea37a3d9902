"""Engine tests run tiny models: one thread avoids oversubscribing the shared CPUs (tiny ops slow
down tenfold when threads contend) and keeps float reductions identical between runs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
