import pytest

from tests.util import one_thread  # noqa: F401 - autouse for every kernel test


@pytest.fixture
def backend(request, monkeypatch):
    """Which path a kernel test runs (parametrize it indirectly): "triton", the Triton kernels on
    CPU under the interpreter (LEANMOE_TRITON_INTERPRET=1); any other name, the torch path."""
    if request.param == "triton":
        monkeypatch.setenv("LEANMOE_TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("LEANMOE_TRITON_INTERPRET", raising=False)
    return request.param
