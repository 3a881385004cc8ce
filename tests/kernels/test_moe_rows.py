"""The C kernels for the MoE's padded rows in bf16 (leanmoe/kernels/cpu_rows.c) against their torch
references, forward and backward."""

import pytest
import torch

from leanmoe.kernels import cpu_kernels, moe_rows


def _layout(n: int, k: int, p: int, seed: int = 0):
    """A padded layout: row_M, each copy's (distinct) row among p; src_P, each row's token (padding
    rows read arbitrary tokens, as MoE.gather_rows's read token 0)."""
    gen = torch.Generator().manual_seed(seed)
    row_M = torch.randperm(p, generator=gen)[: n * k].clone()
    src_P = torch.randint(0, n, (p,), generator=gen)
    src_P[row_M] = torch.arange(n * k) // k
    pad_P = torch.ones(p, dtype=torch.bool)
    pad_P[row_M] = False
    return row_M, src_P, pad_P


def test_kernels_are_built_here():
    assert cpu_kernels.library() is not None, cpu_kernels.status()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,d,p", [(37, 4, 48, 190), (5, 1, 8, 5), (64, 6, 256, 448)])
def test_gather_rows_equals_index_select_and_sums_copies_back(x_dtype, n, k, d, p):
    row_M, src_P, pad_P = _layout(n, k, p)
    x = torch.randn(n, d, dtype=x_dtype, requires_grad=True)
    out = moe_rows.gather_rows(x, src_P, row_M, k)
    ref = moe_rows.gather_rows_reference(x, src_P)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    g = torch.randn(p, d).bfloat16()
    g[pad_P] = 0  # padding rows' outputs are never read: their gradients are zero
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_ref,) = torch.autograd.grad(ref.float(), x, g.float())  # exact sum of the copies' gradients
    assert gx.dtype == x_dtype
    torch.testing.assert_close(gx.float(), gx_ref.float(), atol=0.02 if x_dtype == torch.bfloat16 else 1e-5, rtol=0.01)


@pytest.mark.parametrize("n,k,d,p", [(37, 4, 48, 190), (5, 1, 8, 5), (64, 6, 256, 448)])
def test_combine_rows_equals_weighted_sum_with_gradients(n, k, d, p):
    row_M, _, pad_P = _layout(n, k, p, seed=1)
    y = torch.randn(p, d).bfloat16().requires_grad_()
    w = torch.rand(n, k, requires_grad=True)
    out = moe_rows.combine_rows(y, row_M, w)
    ref = moe_rows.combine_rows_reference(y.float(), row_M, w)  # fp32: the kernel rounds once, at the end
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    g = torch.randn(n, d).bfloat16()
    dy, dw = torch.autograd.grad(out, (y, w), g)
    dy_ref, dw_ref = torch.autograd.grad(ref, (y, w), g.float())
    assert dy.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(dy.float(), dy_ref.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dw, dw_ref, atol=1e-3, rtol=1e-4)
    assert torch.all(dy[pad_P] == 0)  # rows no copy uses: exact zeros (the buffer is not pre-zeroed)


def test_bad_rows_are_refused_before_anything_is_read():
    row_M, src_P, _ = _layout(6, 2, 16)
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="out of range"):
        moe_rows.gather_rows(x, torch.where(src_P == 0, 6, src_P), row_M, 2)
    y = torch.randn(16, 8).bfloat16()
    w = torch.rand(6, 2)
    with pytest.raises(ValueError, match="out of range"):
        moe_rows.combine_rows(y, torch.where(row_M == row_M[0], 16, row_M), w)
    with pytest.raises(ValueError, match=r"int64 \[12\]"):
        moe_rows.combine_rows(y, row_M[:-1], w)
    with pytest.raises(ValueError, match="must be bf16"):
        moe_rows.combine_rows(y.float(), row_M, w)
    repeated = row_M.clone()
    repeated[1] = repeated[0]
    out = moe_rows.combine_rows(y.requires_grad_(), repeated, w)  # the forward may read a row twice...
    with pytest.raises(ValueError, match="repeated"):  # ...but the backward writes each row once
        out.sum().backward()


def test_kernels_apply_only_to_bf16_rows_on_cpu(monkeypatch):
    x = torch.zeros(2, 2)
    assert not moe_rows.rows_kernels_apply(x)  # fp32, no autocast: the packed fp32 path
    assert moe_rows.rows_kernels_apply(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe_rows.rows_kernels_apply(x)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not moe_rows.rows_kernels_apply(x)
    assert not moe_rows.rows_kernels_apply(x.half())
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    assert not moe_rows.rows_kernels_apply(x.bfloat16())
