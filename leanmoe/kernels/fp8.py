"""Fine-grained FP8 (E4M3) casting, as DeepSeek-V3 trains (section 3.3) and DeepGEMM consumes.

Shape legend: M rows (tokens), K columns (the reduction axis of the GEMM that follows), N rows
of a weight, Kb = ceil(K / 128), Mb/Nb likewise.

    per_token_cast_to_fp8(x [M, K])  -> x_fp8 [M, K] e4m3, s [M, Kb] fp32     (1x128 tiles)
    per_block_cast_to_fp8(w [N, K])  -> w_fp8 [N, K] e4m3, s [Nb, Kb] fp32    (128x128 blocks)

For every tile t: amax_t = max(|x| over t, 1e-4), s_t = amax_t / 448 (448 = E4M3's largest
finite value), x_fp8 = round_to_e4m3(x * 448 / amax_t); so x ~= x_fp8 * s_t. With
`use_ue8m0=True` the scale is rounded up to a power of two (DeepGEMM's UE8M0 scale format, which
Blackwell's block-scaled MMA reads), and x_fp8 = round(x / s_t). Shapes that are not multiples
of 128 are padded: the last tile is partial (as if filled with zeros); the fp8 data keeps the
input's shape and only the scale grids round up.

Dispatch: Triton on CUDA/ROCm tensors, the torch reference elsewhere, the Triton kernels on CPU
under LEANMOE_TRITON_INTERPRET=1 (the rule shared by every kernel: leanmoe.kernels.dispatch).
"""

from __future__ import annotations

import torch

from leanmoe.kernels.dispatch import cdiv, tl, triton_jit, use_triton

__all__ = ["per_token_cast_to_fp8", "per_block_cast_to_fp8", "per_token_cast_to_fp8_reference",
           "per_block_cast_to_fp8_reference", "per_token_dequant", "per_block_dequant", "FP8_MAX",
           "FP8_DTYPE", "TILE"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
TILE = 128  # quantisation granularity along K (and along N for weight blocks)
AMAX_EPS = 1e-4  # amax floor: an all-zero tile gets a tiny finite scale, never 0 or inf


# ---------------------------------------------------------------------- torch reference
def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) for positive normal fp32 s, exactly (bit arithmetic, no log)."""
    bits = s.float().view(torch.int32)
    exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exp << 23).view(torch.float32)


def _scale_and_cast(x: torch.Tensor, amax: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., tile] fp32, amax broadcastable -> (fp8 data, fp32 scale)."""
    # NOTE: DeepGEMM's formulas; the Triton kernels reproduce torch's rounding bit for bit:
    # `amax / 448` is an IEEE division, `448 / amax` is computed by torch as 448 * (1 / amax).
    amax = amax.clamp(min=AMAX_EPS)
    if use_ue8m0:
        s = _pow2_ceil(amax / FP8_MAX)
        y = x * (1.0 / s)  # exact: s is a power of two
    else:
        s = amax / FP8_MAX
        y = x * (FP8_MAX / amax)
    # the cast rounds to nearest even; |y| <= 448 up to one fp32 ulp, which rounds back to 448
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), s


def per_token_cast_to_fp8_reference(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float dtype, any strides) -> (x_fp8 [M, K] e4m3, scales [M, ceil(K/128)] fp32)."""
    m, k = x.shape
    kb = cdiv(k, TILE)
    xp = torch.nn.functional.pad(x.float(), (0, kb * TILE - k)).view(m, kb, TILE)
    y, s = _scale_and_cast(xp, xp.abs().amax(dim=-1, keepdim=True), use_ue8m0)
    return y.view(m, kb * TILE)[:, :k].contiguous(), s.view(m, kb)


def per_block_cast_to_fp8_reference(w: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [(G,) N, K] -> (w_fp8 [(G,) N, K] e4m3, scales [(G,) ceil(N/128), ceil(K/128)] fp32)."""
    *lead, n, k = w.shape
    nb, kb = cdiv(n, TILE), cdiv(k, TILE)
    wp = torch.nn.functional.pad(w.float(), (0, kb * TILE - k, 0, nb * TILE - n)).view(*lead, nb, TILE, kb, TILE)
    y, s = _scale_and_cast(wp, wp.abs().amax(dim=(-3, -1), keepdim=True), use_ue8m0)
    return y.view(*lead, nb * TILE, kb * TILE)[..., :n, :k].contiguous(), s.view(*lead, nb, kb)


def per_token_dequant(x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of per_token_cast_to_fp8: x_fp8 [..., M, K], scales [..., M, Kb] -> [..., M, K]."""
    k = x_fp8.shape[-1]
    return (x_fp8.float() * scales.repeat_interleave(TILE, dim=-1)[..., :k]).to(dtype)


def per_block_dequant(w_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of per_block_cast_to_fp8: w_fp8 [..., N, K], scales [..., Nb, Kb] -> [..., N, K]."""
    n, k = w_fp8.shape[-2:]
    s = scales.repeat_interleave(TILE, dim=-2)[..., :n, :].repeat_interleave(TILE, dim=-1)[..., :k]
    return (w_fp8.float() * s).to(dtype)


# ---------------------------------------------------------------------- Triton kernels
@triton_jit
def _round_to_e4m3(y):
    """Round fp32 y (|y| <= 448) to the nearest-even E4M3 value, still in fp32.

    The step between E4M3 values near y is q = 2^(max(e, -6) - 3) for y in [2^e, 2^(e+1)) (3
    mantissa bits; below 2^-6 the subnormal step 2^-9). y / q is exact and below 16 in magnitude,
    so adding and subtracting 1.5 * 2^23 rounds it to an integer, nearest-even.
    NOTE: the final fp8 conversion is then exact everywhere. Triton's interpreter (3.x) rounds
    fp32 -> fp8 half-up and loses the carry into the exponent (7.79 -> 4), so we never rely on it.
    """
    p2 = (y.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)  # 2^e
    q = tl.maximum(p2, 0.015625) * 0.125
    r = ((tl.math.div_rn(y, q) + 12582912.0) - 12582912.0) * q
    # y's sign bit on the result, so a negative value that rounds to zero is -0 as in torch's cast.
    # NOTE: bit arithmetic, not `-x`: compiled Triton negates as 0 - x, which turns -0 into +0
    # (seen on an H200: 15 in 4M elements were +0 where torch gives -0).
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton_jit
def _tile_scale(amax, USE_UE8M0: tl.constexpr):
    """amax (already floored) -> (scale s, multiplier ~1/s), rounded exactly as the reference."""
    s = tl.math.div_rn(amax, 448.0)  # IEEE division (plain `/` may be approximate on GPUs), as torch
    if USE_UE8M0:
        bits = s.to(tl.uint32, bitcast=True)
        exp = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.uint32)
        s = (exp << 23).to(tl.float32, bitcast=True)
        return s, tl.math.div_rn(1.0, s)
    else:
        return s, tl.math.div_rn(1.0, amax) * 448.0


@triton_jit
def _per_token_cast_kernel(x_ptr, y_ptr, s_ptr, M, K, stride_xm, stride_xk,
                           USE_UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, TILE_K: tl.constexpr):
    """One program: BLOCK_M rows x one 128-wide K tile. y [M, K] and s [M, Kb] are contiguous."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * TILE_K + tl.arange(0, TILE_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)  # [BLOCK_M]
    s, inv = _tile_scale(amax, USE_UE8M0)
    y = _round_to_e4m3(tl.clamp(x * inv[:, None], -448.0, 448.0))
    tl.store(y_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * tl.cdiv(K, TILE_K) + pid_k, s, mask=rows < M)


@triton_jit
def _per_block_cast_kernel(w_ptr, y_ptr, s_ptr, N, K, stride_wg, stride_wn, stride_wk,
                           USE_UE8M0: tl.constexpr, TILE_N: tl.constexpr, TILE_K: tl.constexpr):
    """One program: one 128x128 block of group g. y [G, N, K] and s [G, Nb, Kb] are contiguous."""
    pid_n, pid_k, g = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    w_ptr += g * stride_wg
    y_ptr += g * N * K
    s_ptr += g * tl.cdiv(N, TILE_N) * tl.cdiv(K, TILE_K)
    rows = pid_n * TILE_N + tl.arange(0, TILE_N)
    cols = pid_k * TILE_K + tl.arange(0, TILE_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk, mask=mask,
                other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), 1e-4)
    s, inv = _tile_scale(amax, USE_UE8M0)
    y = _round_to_e4m3(tl.clamp(w * inv, -448.0, 448.0))
    tl.store(y_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_n * tl.cdiv(K, TILE_K) + pid_k, s)


def _check_float(name: str, x: torch.Tensor, dims: tuple[int, ...] = (2,)) -> None:
    if x.dim() not in dims or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"{name}: expected a {' or '.join(map(str, dims))}-D float tensor, got "
                         f"{tuple(x.shape)} {x.dtype}")


def per_token_cast_triton(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launcher of per_token_cast_to_fp8 (any strides: x.t() quantises along tokens
    without a copy)."""
    _check_float("per_token_cast_to_fp8", x)
    m, k = x.shape
    y = torch.empty(m, k, device=x.device, dtype=FP8_DTYPE)
    s = torch.empty(m, cdiv(k, TILE), device=x.device, dtype=torch.float32)
    if x.numel():
        block_m = 32
        grid = (cdiv(m, block_m), cdiv(k, TILE))
        _per_token_cast_kernel[grid](x, y, s, m, k, x.stride(0), x.stride(1), USE_UE8M0=use_ue8m0,
                                     BLOCK_M=block_m, TILE_K=TILE, num_warps=4)
    return y, s


def per_block_cast_triton(w: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launcher of per_block_cast_to_fp8 (any strides; [G, N, K] casts each group)."""
    _check_float("per_block_cast_to_fp8", w, (2, 3))
    w3 = w if w.dim() == 3 else w[None]
    g, n, k = w3.shape
    y = torch.empty(g, n, k, device=w.device, dtype=FP8_DTYPE)
    s = torch.empty(g, cdiv(n, TILE), cdiv(k, TILE), device=w.device, dtype=torch.float32)
    if w.numel():
        grid = (cdiv(n, TILE), cdiv(k, TILE), g)
        _per_block_cast_kernel[grid](w3, y, s, n, k, w3.stride(0), w3.stride(1), w3.stride(2),
                                     USE_UE8M0=use_ue8m0, TILE_N=TILE, TILE_K=TILE, num_warps=8)
    return (y, s) if w.dim() == 3 else (y[0], s[0])


# ---------------------------------------------------------------------- dispatch points
# Custom ops so torch.compile sees one node per cast (and never traces into a Triton launcher).
@torch.library.custom_op("leanmoe::per_token_cast_to_fp8", mutates_args=())
def _per_token_cast_op(x: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return per_token_cast_triton(x, use_ue8m0)
    return per_token_cast_to_fp8_reference(x, use_ue8m0)


@_per_token_cast_op.register_fake
def _(x, use_ue8m0):
    m, k = x.shape
    return x.new_empty(m, k, dtype=FP8_DTYPE), x.new_empty(m, cdiv(k, TILE), dtype=torch.float32)


@torch.library.custom_op("leanmoe::per_block_cast_to_fp8", mutates_args=())
def _per_block_cast_op(w: torch.Tensor, use_ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(w):
        return per_block_cast_triton(w, use_ue8m0)
    return per_block_cast_to_fp8_reference(w, use_ue8m0)


@_per_block_cast_op.register_fake
def _(w, use_ue8m0):
    *lead, n, k = w.shape
    return (w.new_empty(*lead, n, k, dtype=FP8_DTYPE),
            w.new_empty(*lead, cdiv(n, TILE), cdiv(k, TILE), dtype=torch.float32))


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K] e4m3, scales [M, ceil(K/128)] fp32): one scale per 1x128 tile,
    x ~= x_fp8 * scale. Any strides (pass x.t() to quantise along the other axis)."""
    _check_float("per_token_cast_to_fp8", x)
    return _per_token_cast_op(x, use_ue8m0)


def per_block_cast_to_fp8(w: torch.Tensor, use_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (w_fp8 [N, K] e4m3, scales [ceil(N/128), ceil(K/128)] fp32): one scale per
    128x128 block. A stack [G, N, K] (grouped experts) casts each matrix: scales [G, Nb, Kb].
    The transpose of the result is the block cast of w.t()."""
    _check_float("per_block_cast_to_fp8", w, (2, 3))
    return _per_block_cast_op(w, use_ue8m0)
