"""FP8 training kernels: linear and grouped-linear ops whose three GEMMs run in fine-grained FP8.

Shape legend: T tokens, K in features, N out features, G experts, Mp padded expert rows.

DeepSeek-V3 section 3.3 (the recipe, per linear y = x W^T with master W in fp32/bf16):

    forward   y  = x W^T      x: 1x128 tiles along K      W: 128x128 blocks
    dgrad     dx = dy W       dy: 1x128 tiles along N     W^T: the same blocks, transposed
    wgrad     dW = dy^T x     dy^T and x^T: 1x128 tiles along T (tokens are the reduction axis,
                              so the activation tiles turn from 1x128 into 128x1)

Every GEMM accumulates in fp32 with the scales applied per 128-wide K step (leanmoe.kernels
.fp8_gemm); the activations are kept for the backward pass in FP8 (x^T, already re-tiled), the
weight gradient comes out in fp32 and the optimizer updates the high-precision master weight.
On CPU the GEMMs run as their references: quantise to E4M3, dequantise, matmul in fp32, so the
numerics of FP8 training are exactly what the tests here measure.

`fp8_linear` / `Fp8Linear` are the dense op and its nn.Linear drop-in; `fp8_grouped_linear` the
grouped op over DeepGEMM's contiguous layout (the experts). Switching a built model over (which
modules, which stay in high precision) is leanmoe.train.fp8.convert_to_fp8.
"""

from __future__ import annotations

import torch
from torch import nn

from leanmoe.kernels.fp8 import per_block_cast_to_fp8, per_token_cast_to_fp8
from leanmoe.kernels.fp8_gemm import fp8_gemm_nt, k_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_contiguous

__all__ = ["Fp8Linear", "fp8_linear", "fp8_grouped_linear"]


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        w8 = per_block_cast_to_fp8(w_NK)
        y_TN = fp8_gemm_nt(per_token_cast_to_fp8(x_TK), w8, out_dtype=out_dtype)
        xt8 = per_token_cast_to_fp8(x_TK.t()) if ctx.needs_input_grad[1] else (None, None)  # [K, T], 128x1 tiles
        ctx.save_for_backward(*w8, *xt8)
        ctx.x_dtype, ctx.w_dtype = x_TK.dtype, w_NK.dtype
        return y_TN

    @staticmethod
    def backward(ctx, dy_TN: torch.Tensor):
        w8, ws, xt8, xts = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            wt8 = (w8.t().contiguous(), ws.t().contiguous())  # W^T [K, N]: blocks transpose with it
            dx = fp8_gemm_nt(per_token_cast_to_fp8(dy_TN), wt8, out_dtype=ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = fp8_gemm_nt(per_token_cast_to_fp8(dy_TN.t()), (xt8, xts), out_dtype=torch.float32).to(ctx.w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with all three GEMMs in fine-grained FP8: x [..., K], weight [N, K] -> [..., N].
    The output (and dx) take x's dtype, or the autocast dtype when autocast is on."""
    dtype = _out_dtype(x)
    y = _Fp8LinearFn.apply(x.reshape(-1, x.shape[-1]), weight, dtype).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(dtype)


class Fp8Linear(nn.Linear):
    """nn.Linear trained in FP8 (same parameters and state-dict keys; the weight stays the
    high-precision master copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


class _Fp8GroupedLinearFn(torch.autograd.Function):
    """y_pad [Mp, N] = x_pad [Mp, K] @ w[g]^T per 128-aligned group segment (DeepGEMM's
    contiguous layout; padding rows are zero in and out)."""

    @staticmethod
    def forward(ctx, x_MK, w_GNK, m_indices, k_ends, out_dtype):
        w8 = per_block_cast_to_fp8(w_GNK)
        y = m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(x_MK), w8, m_indices, out_dtype=out_dtype)
        xt8 = per_token_cast_to_fp8(x_MK.t()) if ctx.needs_input_grad[1] else (None, None)  # [K, Mp]
        ctx.save_for_backward(*w8, *xt8, m_indices, k_ends)
        ctx.x_dtype, ctx.w_dtype = x_MK.dtype, w_GNK.dtype
        return y

    @staticmethod
    def backward(ctx, dy_MN):
        w8, ws, xt8, xts, m_indices, k_ends = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            wt8 = (w8.transpose(1, 2).contiguous(), ws.transpose(1, 2).contiguous())  # [G, K, N]
            dx = m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(dy_MN), wt8, m_indices,
                                                  out_dtype=ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # groups start at multiples of 128 rows, so the 128x1 token tiles never straddle two
            dw = k_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(dy_MN.t()), (xt8, xts), k_ends)
            dw = dw.to(ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_grouped_linear(x_MK: torch.Tensor, w_GNK: torch.Tensor, m_indices: torch.Tensor, k_ends: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Grouped FP8 linear over the padded contiguous layout (see fp8_gemm.contiguous_layout):
    x [Mp, K], w [G, N, K], m_indices [Mp], k_ends [G] -> [Mp, N]."""
    return _Fp8GroupedLinearFn.apply(x_MK, w_GNK, m_indices, k_ends, out_dtype or _out_dtype(x_MK))
