"""Shared fixtures."""
import pytest
import torch


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: tiny tensors gain nothing from more, and on a
    busy 2-core CI machine OpenMP oversubscription slows small ops down many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
