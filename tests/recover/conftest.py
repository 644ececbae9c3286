"""One intra-op thread for these small training runs: at these sizes a second thread buys little, and on a shared,
oversubscribed CPU two spinning OpenMP threads made each step ~15x slower (measured: 0.5 s vs 9 s per step)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
