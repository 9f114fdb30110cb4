"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run every test on one torch thread.

    The tiny test networks gain nothing from a second thread, and on a busy 2-core CI machine
    oversubscribed threads made the same tests 4-10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
