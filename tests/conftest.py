"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_intra_op_thread():
    """Run the suite on one intra-op thread: the tests' tiny tensors gain nothing from more,
    and on a busy 2-core machine OpenMP oversubscription slows small ops down many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
