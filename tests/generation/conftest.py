"""Generation tests run tiny models token by token: one thread is faster than two (no OpenMP
barriers per tiny op, which stall badly when the 2-core machine is shared)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
