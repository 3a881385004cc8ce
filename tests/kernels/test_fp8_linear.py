import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton kernels run on CPU

import pytest
import torch
from torch import nn

from leanmoe.kernels.fp8 import per_block_cast_to_fp8, per_block_dequant, per_token_cast_to_fp8, per_token_dequant
from leanmoe.kernels.fp8_linear import Fp8Linear, fp8_linear


def _tok(x):  # quantise-dequantise with 1x128 tiles along the last axis
    return per_token_dequant(*per_token_cast_to_fp8(x))


def _blk(w):  # quantise-dequantise with 128x128 blocks
    return per_block_dequant(*per_block_cast_to_fp8(w))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _emulated_linear(x, w, dy):
    """DeepSeek-V3 section 3.3 written out: y, dx, dw from quantised-dequantised operands."""
    y = _tok(x) @ _blk(w).T
    dx = _tok(dy) @ _blk(w)
    dw = _tok(dy.T) @ _tok(x.T).T  # both re-tiled along tokens
    return y, dx, dw


@pytest.mark.parametrize("t,k,n", [(1, 7, 3), (5, 130, 200), (300, 256, 64), (130, 129, 130)])
def test_fp8_linear_is_the_three_quantised_gemms(t, k, n):
    x = torch.randn(t, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    dy = torch.randn(t, n)
    y = fp8_linear(x, w)
    y.backward(dy)
    ey, edx, edw = _emulated_linear(x.detach(), w.detach(), dy)
    torch.testing.assert_close(y, ey, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, edx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, edw, rtol=1e-5, atol=1e-5)


def test_fp8_linear_close_to_fp32():
    # E4M3 keeps 3 mantissa bits: each GEMM is ~3-4% off in relative norm (measured 3.6%)
    x = torch.randn(256, 384, requires_grad=True)
    w = (torch.randn(200, 384) * 0.05).requires_grad_()
    dy = torch.randn(256, 200)
    lin = Fp8Linear(384, 200, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.normal_()
    y = lin(x)
    y.backward(dy)
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    torch.testing.assert_close(lin.bias.grad, dy.sum(0))  # the bias stays out of FP8
    x.grad = None
    y_ref = nn.functional.linear(x, w, lin.bias.detach())
    y_ref.backward(dy)
    assert _rel(y, y_ref) < 0.05 and _rel(gx, x.grad) < 0.05 and _rel(gw, w.grad) < 0.05


def test_fp8_linear_shapes_autocast_and_frozen_weight():
    lin = Fp8Linear(64, 32, bias=False)
    x = torch.randn(2, 3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    lin.weight.requires_grad_(False)
    x.requires_grad_()
    lin(x).sum().backward()
    assert x.grad.shape == x.shape and lin.weight.grad is None


def test_compiles():
    lin = Fp8Linear(200, 64, bias=False)
    x = torch.randn(16, 200, requires_grad=True)
    f = torch.compile(lambda t: lin(t).square().sum(), backend="aot_eager", fullgraph=True)
    f(x).backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad = lin.weight.grad = None
    lin(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, lin.weight.grad)
