import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # NOTE: kernel tests run many small ops; on a shared 2-core machine OpenMP's spin-waiting made
    # 2 threads ~2x slower overall (20x for the FP8 training run). One thread is also deterministic.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
