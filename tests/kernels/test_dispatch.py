import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton kernels run on CPU

import pytest
import torch

from leanmoe.kernels import dispatch
from leanmoe.kernels.dispatch import cdiv, check_tile_config, next_power_of_2


def test_dispatch_rule(monkeypatch):
    x = torch.randn(4, 4)
    monkeypatch.delenv("LEANMOE_TRITON_INTERPRET", raising=False)
    assert not dispatch.use_triton(x)
    if dispatch.triton is not None:
        monkeypatch.setenv("LEANMOE_TRITON_INTERPRET", "1")
        assert dispatch.use_triton(x)
        monkeypatch.setattr(dispatch, "InterpretedFunction", type(None))  # as if triton were compiled-mode
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.use_triton(x)  # asked for Triton on CPU but cannot: an error, not the reference


@pytest.mark.parametrize("x,want", [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (576, 1024)])
def test_next_power_of_2(x, want):
    assert next_power_of_2(x) == want


@pytest.mark.parametrize("a,b,want", [(0, 128, 0), (1, 128, 1), (128, 128, 1), (129, 128, 2)])
def test_cdiv(a, b, want):
    assert cdiv(a, b) == want


def test_check_tile_config():
    assert check_tile_config("op", None) is None
    assert check_tile_config("op", (64, 32, 8, 3)) == [64, 32, 8, 3]
    for bad in [(64, 32, 8), (48, 32, 8, 2), (64, 32, 6, 2), (64, 0, 8, 2), (64.0, 32, 8, 2)]:
        with pytest.raises(ValueError, match="op: tile_config"):
            check_tile_config("op", bad)
