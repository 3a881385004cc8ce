"""The MoE's padded token-copy rows on CPUs in bf16: the gather into expert order and the weighted
combine back, each forward and backward in one pass of a C kernel (leanmoe/kernels/cpu_rows.c).

Shape legend: N tokens, K copies per token, P rows (copies sorted by expert, each expert's group
padded; see leanmoe.model.moe.MoE.gather_rows), D hidden.

    gather_rows(x [N, D], src [P], row [N*K], k)   -> bf16 [P, D]   row i is x[src[i]]
    combine_rows(y [P, D] bf16, row [N*K], w [N, K]) -> bf16 [N, D]  sum_j w[t, j] y[row[t*K + j]]

`row` lists each copy's row (distinct rows; the rest are padding). The torch references,
`gather_rows_reference` and `combine_rows_reference`, are what MoE runs when the kernels cannot
(no C compiler, other dtypes, LEANMOE_CPU_KERNELS=0); tests/kernels/test_moe_rows.py holds the two
equal, gradients included.
"""

from __future__ import annotations

import torch

__all__ = ["rows_kernels_apply", "gather_rows", "combine_rows", "gather_rows_reference", "combine_rows_reference"]


def rows_kernels_apply(x: torch.Tensor) -> bool:
    """Whether the C kernels run for the rows of x: a CPU tensor whose expert inputs are bf16
    (autocast's dtype, or x's own), built kernels, and no torch.compile tracing."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling():
        return False  # traced: the references, which the compiler can fuse
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype != torch.bfloat16:
        return False
    from leanmoe.kernels.cpu_kernels import library

    return library() is not None


def gather_rows_reference(x_ND: torch.Tensor, src_P: torch.Tensor) -> torch.Tensor:
    return x_ND.to(torch.bfloat16).index_select(0, src_P)


def combine_rows_reference(y_PD: torch.Tensor, row_M: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    n, k = w_NK.shape
    return (y_PD.index_select(0, row_M).view(n, k, -1) * w_NK.to(y_PD.dtype)[..., None]).sum(dim=1)


def _lib():
    from leanmoe.kernels.cpu_kernels import library, status

    lib = library()
    if lib is None:
        raise RuntimeError(f"leanmoe.kernels.moe_rows needs the C kernels; they are {status()}")
    return lib


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise ValueError(f"{what}: a row index is out of range (or repeated where rows must be distinct)")
    if rc != 0:
        raise MemoryError(f"{what}: the C kernel failed ({rc})")


def _sum_rows(y_PD: torch.Tensor, row_M: torch.Tensor, w_NK: torch.Tensor | None, n: int, k: int,
              out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(n, y_PD.shape[1], dtype=out_dtype)
    rc = _lib().leanmoe_sum_rows_bf16(y_PD.data_ptr(), row_M.data_ptr(), None if w_NK is None else w_NK.data_ptr(),
                                      n, k, y_PD.shape[1], y_PD.shape[0], out.data_ptr(),
                                      int(out_dtype == torch.float32), torch.get_num_threads())
    _check(rc, "sum_rows")
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, src_P, row_M, k):
        x = x_ND.detach().contiguous()
        n, d = x.shape
        out = torch.empty(src_P.shape[0], d, dtype=torch.bfloat16)
        rc = _lib().leanmoe_gather_rows_bf16(x.data_ptr(), int(x.dtype == torch.bfloat16), src_P.data_ptr(), n,
                                             src_P.shape[0], d, out.data_ptr(), torch.get_num_threads())
        _check(rc, "gather_rows")
        ctx.save_for_backward(row_M)
        ctx.k, ctx.n, ctx.x_dtype = k, n, x.dtype
        return out

    @staticmethod
    def backward(ctx, g_PD):
        (row_M,) = ctx.saved_tensors
        # each token's gradient: the sum of its copies' (padding rows feed no token)
        g = g_PD.to(torch.bfloat16).contiguous()
        return _sum_rows(g, row_M, None, ctx.n, ctx.k, ctx.x_dtype), None, None, None


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PD, row_M, w_NK):
        y, w = y_PD.detach().contiguous(), w_NK.detach().float().contiguous()
        n, k = w.shape
        ctx.save_for_backward(y, row_M, w)
        ctx.w_dtype = w_NK.dtype
        return _sum_rows(y, row_M, w, n, k, torch.bfloat16)

    @staticmethod
    def backward(ctx, g_ND):
        y, row_M, w = ctx.saved_tensors
        g = g_ND.to(torch.bfloat16).contiguous()
        (n, k), (p, d) = w.shape, y.shape
        dy = torch.empty(p, d, dtype=torch.bfloat16)
        dw = torch.empty(n, k, dtype=torch.float32)
        rc = _lib().leanmoe_combine_backward_bf16(g.data_ptr(), y.data_ptr(), row_M.data_ptr(), w.data_ptr(), n, k, d,
                                                  p, dy.data_ptr(), dw.data_ptr(), torch.get_num_threads())
        _check(rc, "combine_rows backward")
        return dy, None, dw.to(ctx.w_dtype)


def _check_rows(row_M: torch.Tensor, n: int, k: int) -> torch.Tensor:
    if row_M.dtype != torch.int64 or row_M.shape != (n * k,):
        raise ValueError(f"row must be int64 [{n * k}] (one row per token copy), got {row_M.dtype} {tuple(row_M.shape)}")
    return row_M.contiguous()


def gather_rows(x_ND: torch.Tensor, src_P: torch.Tensor, row_M: torch.Tensor, k: int) -> torch.Tensor:
    """x [N, D] (fp32 or bf16) -> bf16 [P, D], row i = x[src[i]]; differentiable in x. row_M [N*K]:
    each copy's row, which the backward sums per token (padding rows carry no gradient)."""
    if src_P.dtype != torch.int64:
        raise ValueError(f"src must be int64, got {src_P.dtype}")
    return _GatherRows.apply(x_ND, src_P.contiguous(), _check_rows(row_M, x_ND.shape[0], k), k)


def combine_rows(y_PD: torch.Tensor, row_M: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """y [P, D] bf16, row_M [N*K] distinct rows, w [N, K] -> bf16 [N, D]; differentiable in y and w."""
    if y_PD.dtype != torch.bfloat16:
        raise ValueError(f"combine_rows: y must be bf16, got {y_PD.dtype}")
    n, k = w_NK.shape
    return _CombineRows.apply(y_PD, _check_rows(row_M, n, k), w_NK)
