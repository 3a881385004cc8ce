"""FP8 GEMMs with DeepGEMM's semantics, a bf16 grouped GEMM, and their torch references.

Shape legend: M rows of a (tokens), N rows of b (out features), K the reduction axis, G groups
(experts), Kb = ceil(K / 128), Nb = ceil(N / 128). "nt": both operands are K-major, d = a @ b^T.

    fp8_gemm_nt((a [M, K], sa [M, Kb]), (b [N, K], sb [Nb, Kb] or [N, Kb]))    -> d [M, N]
    m_grouped_fp8_gemm_nt_contiguous((a [M, K], sa), (b [G, N, K], sb [G, Nb, Kb]), m_indices [M])
        d[m] = a[m] @ b[m_indices[m]]^T; rows with m_indices = -1 are skipped (written as 0).
        The MoE training / prefill layout: each group's rows contiguous, starting at a multiple
        of 128 (`get_m_alignment_for_contiguous_layout()`, built by `contiguous_layout`).
    m_grouped_fp8_gemm_nt_masked((a [G, M, K], sa [G, M, Kb]), (b [G, N, K], sb), masked_m [G])
        d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T; later rows are 0. The decode layout.
    k_grouped_fp8_gemm_nt_contiguous((a [M, T], sa [M, Tb]), (b [N, T], sb [N, Tb]), k_ends [G])
        d[g] = a[:, k_lo:k_hi] @ b[:, k_lo:k_hi]^T with k_lo = k_ends[g-1] (0 for g = 0),
        k_hi = k_ends[g] (inclusive cumulative ends, not sizes): the expert weight gradient,
        tokens being the reduction axis.
    m_grouped_bf16_gemm_nt_contiguous(a [M, K], b [G, N, K], m_indices)   (no scales, any GPU)

The math (DeepGEMM, and DeepSeek-V3 section 3.3.2 "increasing accumulation precision"): a is
scaled per 1x128 tile, b per 128x128 block (or per 1x128 tile for the weight gradient), and the
kernel walks K in 128-wide steps, promoting each step's partial product into an fp32
accumulator with both scales applied:

    acc[m, n] += (sum_{k in step} a8[m, k] b8[n, k]) * sa[m, step] * sb[n // 128, step]

Output is bf16 unless `out_dtype` asks for fp32 (weight gradients). All of them share one Triton
kernel (`_gemm_nt_kernel`, the mode a constexpr) behind one custom op (`leanmoe::gemm_nt`) so
torch.compile sees one node; `_reference` (dequantise, matmul in fp32, loop over groups) is the
CPU path and what the tests hold the kernel to. `grouped_mm_contiguous` / `grouped_mm_wgrad_
contiguous` run leanmoe's `grouped_mm` contract (unpadded offsets) on the bf16 kernels.

Every launcher takes `tile_config=(block_m, block_n, num_warps, num_stages)` to try another tile
shape (bench/kernels.py --sweep times the alternatives); None, the default, is the measured choice
(see `_tile_config`). On Hopper the fp8 plain and m-grouped GEMMs also run on cuBLAS's own blockwise
GEMM (`backend=` / LEANMOE_FP8_GEMM: "auto" takes it where it measured faster, from 4096 rows; see
leanmoe.kernels.fp8_cublas).

Layouts that DeepGEMM requires aligned are correct here at any alignment, on both paths (the
reference and the kernel answer the same, so the CPU tests see what a GPU computes): an
m-grouped tile whose 128 rows hold several groups makes one pass per group, and a k-grouped
range that starts mid-tile walks 128-aligned steps masked to the range, so each step still reads
one scale column. The aligned layouts stay the fast ones (one pass, no partial steps). No check
reads m_indices or k_ends on the host, so none adds a host sync. Group ids outside [0, G) are
padding; K ranges are clamped to [0, K] (an empty or reversed range gives zeros).
"""

from __future__ import annotations

import functools

import torch

from leanmoe.kernels.dispatch import cdiv, check_tile_config, next_power_of_2, tl, triton_jit, use_triton
from leanmoe.kernels.fp8_cublas import K_GROUPED as _K_GROUPED
from leanmoe.kernels.fp8_cublas import M_CONTIGUOUS as _M_CONTIGUOUS
from leanmoe.kernels.fp8_cublas import M_MASKED as _M_MASKED
from leanmoe.kernels.fp8_cublas import PLAIN as _PLAIN
from leanmoe.kernels.fp8_cublas import _backend_choice, _cublas_call, _pick_backend
from leanmoe.kernels.fp8 import FP8_DTYPE, TILE, per_block_dequant, per_token_dequant

__all__ = ["fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
           "k_grouped_fp8_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_contiguous", "k_grouped_gemm_nt_contiguous",
           "get_m_alignment_for_contiguous_layout", "contiguous_layout", "grouped_mm_contiguous",
           "grouped_mm_wgrad_contiguous", "calc_diff"]


TileConfig = tuple[int, int, int, int]  # (block_m, block_n, num_warps, num_stages)


def get_m_alignment_for_contiguous_layout() -> int:
    """Rows per group in the contiguous layouts are padded to a multiple of this (DeepGEMM's 128)."""
    return TILE


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity test: 1 - 2 sum(x y) / sum(x^2 + y^2); 0 for identical tensors."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


# ---------------------------------------------------------------------- Triton kernel
@triton_jit
def _dot_steps(acc, a_ptr, b_ptr, sa_ptr, sb_ptr, rows, cols, row_ok, col_ok, k_lo, k_hi,
               s_am, s_ak, s_bn, s_bk, s_sam, s_sak, s_sbn, s_sbk,
               SCALED: tl.constexpr, SB_ROWS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BM, BN] + sum_{k_lo <= k < k_hi} a[rows, k] b[cols, k] (scaled per 128-wide step), over
    rows with row_ok. Pointers are already offset to the group. The steps start at k_lo rounded
    down to BLOCK_K, so each step lies inside one scale column even when k_lo is mid-tile (a
    k-grouped range that starts anywhere); elements outside [k_lo, k_hi) load as 0."""
    k_start = (k_lo // BLOCK_K) * BLOCK_K
    ks = k_start + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * s_am + ks[None, :] * s_ak  # [BM, BK]
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * s_bn + ks[:, None] * s_bk  # [BK, BN]
    for k0 in range(k_start, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = (k >= k_lo) & (k < k_hi)
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
        if UPCAST == 1:
            a, b = a.to(tl.bfloat16), b.to(tl.bfloat16)
        if UPCAST == 2:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if SCALED:
            kb = k0 // BLOCK_K  # BLOCK_K == 128: one scale column per step
            sa = tl.load(sa_ptr + rows * s_sam + kb * s_sak, mask=row_ok, other=0.0)
            sb = tl.load(sb_ptr + (cols // SB_ROWS) * s_sbn + kb * s_sbk, mask=col_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton_jit
def _gemm_nt_kernel(
    a_ptr, b_ptr, d_ptr, sa_ptr, sb_ptr, grp_ptr,
    M, N, K, G,
    s_ag, s_am, s_ak, s_bg, s_bn, s_bk, s_dg, s_dm, s_dn,
    s_sag, s_sam, s_sak, s_sbg, s_sbn, s_sbk,
    MODE: tl.constexpr,          # 0 plain, 1 m-grouped contiguous, 2 m-grouped masked, 3 k-grouped
    SCALED: tl.constexpr,        # fp8 operands with per-128-step scales
    SB_ROWS: tl.constexpr,       # rows of b sharing one scale: 128 (blocks) or 1 (1x128 tiles)
    UPCAST: tl.constexpr,        # 0: tl.dot on the loaded dtype; 1: bf16; 2: fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,   # plain mode: program_id(1) takes one of SPLIT_K ranges of K steps
):
    # tile order: GROUP_M row tiles share each column sweep, so b stays in L2 (standard swizzle)
    pid = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * n_n)) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 1:
        # The tile's rows may hold several groups (any m_indices is correct; the 128-aligned
        # contiguous layout is the fast one: one group per tile, one pass). Ids outside [0, G)
        # are padding, as in the reference. Each pass loads only its group's rows of a, so the
        # other rows add exact zeros (b is finite: E4M3 has no inf).
        idx = tl.load(grp_ptr + rows, mask=row_ok, other=-1)
        idx = tl.where(idx < G, idx, -1)
        g_hi = tl.max(idx, axis=0).to(tl.int64)  # int64: b's group offset can pass 2^31 elements
        g_lo = tl.min(tl.where(idx >= 0, idx, g_hi), axis=0).to(tl.int64)
        g_lo = tl.where(g_hi >= 0, g_lo, 0)  # no group in the tile: no pass
        for gg in range(g_lo, g_hi + 1):
            acc = _dot_steps(acc, a_ptr, b_ptr + gg * s_bg, sa_ptr, sb_ptr + gg * s_sbg, rows, cols,
                             row_ok & (idx == gg), col_ok, 0, K, s_am, s_ak, s_bn, s_bk, s_sam, s_sak, s_sbn,
                             s_sbk, SCALED, SB_ROWS, UPCAST, BLOCK_K)
        acc = tl.where((idx >= 0)[:, None], acc, 0.0)  # skipped rows are written as zeros
    else:
        k_lo, k_hi = 0, K
        if SPLIT_K > 1:  # plain mode, split-K: this program's share of the K steps; d is [SPLIT_K, M, N] fp32
            per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
            k_lo = g * per
            k_hi = tl.minimum(k_lo + per, K)
        if MODE == 2:
            m_valid = tl.load(grp_ptr + g)
            row_ok = rows < m_valid
            k_hi = tl.where(pid_m * BLOCK_M < m_valid, K, 0)
        if MODE == 3:  # K range [k_ends[g-1], k_ends[g]), clamped to [0, K] as the reference slices
            k_lo = tl.minimum(tl.maximum(tl.load(grp_ptr + g - 1, mask=g > 0, other=0), 0), K)
            k_hi = tl.minimum(tl.maximum(tl.load(grp_ptr + g), 0), K)
        acc = _dot_steps(acc, a_ptr + g * s_ag, b_ptr + g * s_bg, sa_ptr + g * s_sag, sb_ptr + g * s_sbg, rows,
                         cols, row_ok, col_ok, k_lo, k_hi, s_am, s_ak, s_bn, s_bk, s_sam, s_sak, s_sbn, s_sbk,
                         SCALED, SB_ROWS, UPCAST, BLOCK_K)
        if MODE == 2:  # skipped rows are written as zeros
            acc = tl.where(row_ok[:, None], acc, 0.0)
    row_ok = rows < M
    d_ptrs = d_ptr + g * s_dg + rows[:, None].to(tl.int64) * s_dm + cols[None, :] * s_dn
    tl.store(d_ptrs, acc.to(d_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# NOTE: the interpreter pays per operation, not per element: wide tiles make it ~2x faster.
_INTERPRETER_BLOCK_N = 512


@functools.lru_cache(maxsize=None)
def _upcast_mode(device_type: str, index: int | None, dtype: torch.dtype) -> int:
    """How the kernel feeds tl.dot: fp8 MMA needs sm_89+ (Ada, Hopper, Blackwell); older NVIDIA
    and ROCm GPUs get the (exact) fp8 -> bf16 upcast. NOTE: Triton 3.x's interpreter computes
    bf16 tl.dot on raw bits, so on the CPU interpreter bf16 operands go through fp32 (exact too)."""
    if device_type != "cuda":
        return 2 if dtype == torch.bfloat16 or dtype == torch.float16 else 0
    if dtype != FP8_DTYPE:
        return 0
    if torch.version.hip is not None or torch.cuda.get_device_capability(index) < (8, 9):
        return 1
    return 0


def _tile_config(mode: int, m: int, on_gpu: bool, tile_config=None) -> TileConfig:
    """(block_m, block_n, num_warps, num_stages): the caller's `tile_config` if given, else the
    default. block_m shrinks to small M (a contiguous-layout tile may straddle groups: the kernel
    then makes one pass per group, so 128-row tiles over a 128-aligned layout stay one pass)."""
    block_m = max(16, min(128, next_power_of_2(m)))
    if tile_config is not None:
        bm, bn, w, st = tile_config
        return min(bm, block_m), bn, w, st
    if not on_gpu:
        return block_m, _INTERPRETER_BLOCK_N, 8, 3
    # Measured on an H200 (bench/kernels.py --sweep, docs/benchmarks.md): 128x128x128 tiles, 8
    # warps, 3 stages were the best or within 10% of it at every swept shape.
    return block_m, 128, 8, 3


def _launch(mode: int, a, sa, b, sb, grp, out: torch.Tensor, m: int, n: int, k: int, n_groups: int,
            tile_config=None, split_k: int = 1) -> None:
    """Strides are read as 3-D ([group, row, col]); a 2-D operand gets group stride 0."""
    def s3(t):
        if t is None:
            return 0, 0, 0
        return (t.stride(0), t.stride(1), t.stride(2)) if t.dim() == 3 else (0, t.stride(0), t.stride(1))

    scaled = sa is not None
    sb_rows = 1 if scaled and sb.shape[-2] == n and n > 1 else TILE
    block_m, block_n, num_warps, num_stages = _tile_config(mode, m, a.device.type == "cuda", tile_config)
    block_k = TILE if scaled else 64  # one scale per 128-wide step; bf16 tiles are twice the bytes
    grid = (cdiv(m, block_m) * cdiv(n, block_n), n_groups if mode in (_M_MASKED, _K_GROUPED) else split_k)
    _gemm_nt_kernel[grid](
        a, b, out, sa if scaled else a, sb if scaled else b, grp if grp is not None else a,
        m, n, k, b.shape[0] if mode == _M_CONTIGUOUS else n_groups, *s3(a), *s3(b), *s3(out), *s3(sa), *s3(sb),
        MODE=mode, SCALED=scaled, SB_ROWS=sb_rows, UPCAST=_upcast_mode(a.device.type, a.device.index, a.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, SPLIT_K=split_k, num_warps=num_warps,
        num_stages=num_stages)


# ---------------------------------------------------------------------- torch reference
def _dequant(x, s, per_block: bool) -> torch.Tensor:
    if s is None:
        return x.float()
    return per_block_dequant(x, s) if per_block else per_token_dequant(x, s)


def _reference(mode: int, a, sa, b, sb, grp, n_groups: int, out_dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[-2]
    a32 = _dequant(a, sa, per_block=False)
    b32 = _dequant(b, sb, per_block=sb is not None and not (sb.shape[-2] == n and n > 1))
    if mode == _PLAIN:
        return (a32 @ b32.T).to(out_dtype)
    if mode == _M_MASKED:
        valid = torch.arange(a.shape[1], device=a.device)[None, :] < grp[:, None]  # [G, M]
        return (torch.bmm(a32, b32.transpose(1, 2)) * valid[..., None]).to(out_dtype)
    if mode == _M_CONTIGUOUS:
        out = a32.new_zeros(a.shape[0], n)
        for g in range(b.shape[0]):
            rows = (grp == g).nonzero().squeeze(1)  # host sync: reference only
            if rows.numel():
                out[rows] = a32[rows] @ b32[g].T
        return out.to(out_dtype)
    t = a.shape[1]
    ends = [min(max(e, 0), t) for e in grp.tolist()]  # host sync: reference only; clamped as the kernel
    starts = [0] + ends[:-1]
    return torch.stack([a32[:, s:e] @ b32[:, s:e].T for s, e in zip(starts, ends)]).to(out_dtype) \
        if n_groups else a32.new_zeros(0, a.shape[0], n, dtype=out_dtype)


# ---------------------------------------------------------------------- the one op
def _out_shape(mode: int, a: torch.Tensor, b: torch.Tensor, n_groups: int) -> tuple[int, ...]:
    n = b.shape[-2]
    if mode == _M_MASKED:
        return a.shape[0], a.shape[1], n
    if mode == _K_GROUPED:
        return n_groups, a.shape[0], n
    return a.shape[0], n


@torch.library.custom_op("leanmoe::gemm_nt", mutates_args=())
def _gemm_nt_op(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor | None, sb: torch.Tensor | None,
                grp: torch.Tensor | None, mode: int, n_groups: int, out_dtype: torch.dtype,
                tile_config: list[int] | None = None, backend: str | None = None, split_k: int = 1) -> torch.Tensor:
    choice = _backend_choice(backend)
    if split_k > 1:  # a Triton kernel option
        if choice == "cublas":
            raise ValueError("fp8 GEMM: split_k is an option of the Triton kernel; backend 'cublas' takes none")
        choice = "triton"
    picked = _pick_backend(choice, mode, a, b, sa)  # raises where "cublas" is asked and cannot run (CPU too)
    if not use_triton(a):
        with torch.autocast(a.device.type, enabled=False):  # the emulation matmuls in fp32, always
            return _reference(mode, a, sa, b, sb, grp, n_groups, out_dtype)
    if picked == "cublas":
        return _cublas_call(mode, a, sa, b, sb, grp, out_dtype)
    m, k = a.shape[-2], a.shape[-1]
    if split_k > 1 and mode == _PLAIN:  # fp32 partial products of each K range, summed after
        part = torch.empty(split_k, m, b.shape[-2], device=a.device, dtype=torch.float32)
        if part.numel():
            _launch(mode, a, sa, b, sb, grp, part, m, b.shape[-2], k, n_groups, tile_config, split_k)
        return part.sum(0).to(out_dtype)
    out = torch.empty(_out_shape(mode, a, b, n_groups), device=a.device, dtype=out_dtype)
    if out.numel():
        _launch(mode, a, sa, b, sb, grp, out, m, b.shape[-2], k, n_groups, tile_config)
    return out


@_gemm_nt_op.register_fake
def _(a, b, sa, sb, grp, mode, n_groups, out_dtype, tile_config=None, backend=None, split_k=1):
    return a.new_empty(_out_shape(mode, a, b, n_groups), dtype=out_dtype)


def _check(name: str, a, sa, b, sb, a_dims: int, b_dims: int, sb_rows_ok: tuple[int, ...]) -> None:
    """Shapes, dtypes and K-major layout of one call (DeepGEMM's contract)."""
    if a.dim() != a_dims or b.dim() != b_dims or a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name}: a {tuple(a.shape)} and b {tuple(b.shape)} must be {a_dims}-D and {b_dims}-D "
                         f"with the same K")
    for t, what in ((a, "a"), (b, "b")):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: {what} must be K-major (stride 1 along K), got strides {t.stride()}")
    if sa is None:
        if a.dtype not in (torch.bfloat16, torch.float16, torch.float32) or b.dtype != a.dtype:
            raise ValueError(f"{name}: a and b must share a float dtype, got {a.dtype} and {b.dtype}")
        return
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if sa.dtype != torch.float32 or sb.dtype != torch.float32:
        raise ValueError(f"{name}: scales must be fp32")
    kb = cdiv(a.shape[-1], TILE)
    if tuple(sa.shape) != (*a.shape[:-1], kb):
        raise ValueError(f"{name}: a scales must be {(*a.shape[:-1], kb)} (1x128 tiles), got {tuple(sa.shape)}")
    if sb.shape[-1] != kb or sb.shape[-2] not in sb_rows_ok or sb.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"{name}: b scales must be [..., {' or '.join(map(str, sb_rows_ok))}, {kb}], "
                         f"got {tuple(sb.shape)}")


def fp8_gemm_nt(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                out_dtype: torch.dtype = torch.bfloat16, *, tile_config: TileConfig | None = None,
                backend: str | None = None, split_k: int = 1) -> torch.Tensor:
    """d [M, N] = a @ b^T from fp8 operands: a = (a [M, K] e4m3, sa [M, Kb]); b = (b [N, K] e4m3,
    sb [Nb, Kb] per 128x128 block, or [N, Kb] per 1x128 tile as for weight gradients).
    backend: "triton", "cublas" (sm_90) or "auto" (None: LEANMOE_FP8_GEMM, default auto).
    split_k > 1 (Triton): split_k programs per output tile, each over a range of K's 128-wide steps,
    their fp32 partials summed after: more programs for small M (not a default: untimed on a GPU)."""
    (a8, sa), (b8, sb) = a, b
    n = b8.shape[0]
    _check("fp8_gemm_nt", a8, sa, b8, sb, 2, 2, (cdiv(n, TILE), n))
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"fp8_gemm_nt: split_k must be a positive int, got {split_k!r}")
    return _gemm_nt_op(a8, b8, sa, sb, None, _PLAIN, 1, out_dtype,
                       check_tile_config("fp8_gemm_nt", tile_config), backend, split_k)


def m_grouped_fp8_gemm_nt_contiguous(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                     m_indices: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                                     tile_config: TileConfig | None = None, backend: str | None = None) -> torch.Tensor:
    """d [M, N]: d[m] = a[m] @ b[m_indices[m]]^T. a = (a [M, K], sa [M, Kb]), b = (b [G, N, K],
    sb [G, Nb, Kb]); m_indices [M] int32, -1 for padding rows (their output is 0). Any layout is
    correct; contiguous groups starting at multiples of 128 rows are the fast one (see
    `contiguous_layout`). backend as fp8_gemm_nt's (cuBLAS: one GEMM per run of equal ids, which
    reads m_indices on the host)."""
    (a8, sa), (b8, sb) = a, b
    _check("m_grouped_fp8_gemm_nt_contiguous", a8, sa, b8, sb, 2, 3, (cdiv(b8.shape[1], TILE),))
    _check_indices("m_grouped_fp8_gemm_nt_contiguous", m_indices, a8.shape[0])
    return _gemm_nt_op(a8, b8, sa, sb, m_indices.to(torch.int32), _M_CONTIGUOUS, 1, out_dtype,
                       check_tile_config("m_grouped_fp8_gemm_nt_contiguous", tile_config), backend)


def m_grouped_fp8_gemm_nt_masked(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                 masked_m: torch.Tensor, expected_m: int | None = None,
                                 out_dtype: torch.dtype = torch.bfloat16, *,
                                 tile_config: TileConfig | None = None, backend: str | None = None) -> torch.Tensor:
    """d [G, M, N]: d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T, later rows 0. a = (a [G, M, K],
    sa [G, M, Kb]), b = (b [G, N, K], sb [G, Nb, Kb]); masked_m [G] int32 stays on the device (no
    host sync), so the call can be captured in a CUDA graph. expected_m is accepted for
    DeepGEMM compatibility (a tile-size hint there; unused here). backend as fp8_gemm_nt's (cuBLAS:
    one GEMM per group over all M rows, no host sync either)."""
    (a8, sa), (b8, sb) = a, b
    _check("m_grouped_fp8_gemm_nt_masked", a8, sa, b8, sb, 3, 3, (cdiv(b8.shape[1], TILE),))
    if a8.shape[0] != b8.shape[0]:
        raise ValueError(f"m_grouped_fp8_gemm_nt_masked: a {tuple(a8.shape)} and b {tuple(b8.shape)} must agree on G")
    _check_groups("m_grouped_fp8_gemm_nt_masked", "masked_m", masked_m, b8.shape[0])
    return _gemm_nt_op(a8, b8, sa, sb, masked_m.to(torch.int32), _M_MASKED, b8.shape[0], out_dtype,
                       check_tile_config("m_grouped_fp8_gemm_nt_masked", tile_config), backend)


def k_grouped_fp8_gemm_nt_contiguous(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                                     k_ends: torch.Tensor, out_dtype: torch.dtype = torch.float32, *,
                                     tile_config: TileConfig | None = None) -> torch.Tensor:
    """d [G, M, N]: d[g] = a[:, Kg] @ b[:, Kg]^T over K ranges Kg = [k_ends[g-1], k_ends[g]).
    a = (a [M, T], sa [M, Tb]), b = (b [N, T], sb [N, Tb]), both with 1x128 tiles along T.
    k_ends [G] are inclusive cumulative ends (DeepGEMM passes sizes: see leanmoe.kernels.deep_gemm).
    Ranges may start anywhere (ranges starting at multiples of 128 are the fast case). The weight
    gradient of grouped experts (T = tokens)."""
    (a8, sa), (b8, sb) = a, b
    _check("k_grouped_fp8_gemm_nt_contiguous", a8, sa, b8, sb, 2, 2, (b8.shape[0],))
    _check_groups("k_grouped_fp8_gemm_nt_contiguous", "k_ends", k_ends)
    return _gemm_nt_op(a8, b8, sa, sb, k_ends.to(torch.int32), _K_GROUPED, k_ends.shape[0], out_dtype,
                       check_tile_config("k_grouped_fp8_gemm_nt_contiguous", tile_config))


def m_grouped_bf16_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, m_indices: torch.Tensor, *,
                                      tile_config: TileConfig | None = None) -> torch.Tensor:
    """bf16 counterpart of m_grouped_fp8_gemm_nt_contiguous for GPUs without FP8: a [M, K],
    b [G, N, K] (same dtype), m_indices [M] -> d [M, N] in a's dtype, fp32 accumulation."""
    _check("m_grouped_bf16_gemm_nt_contiguous", a, None, b, None, 2, 3, ())
    _check_indices("m_grouped_bf16_gemm_nt_contiguous", m_indices, a.shape[0])
    return _gemm_nt_op(a, b, None, None, m_indices.to(torch.int32), _M_CONTIGUOUS, 1, a.dtype,
                       check_tile_config("m_grouped_bf16_gemm_nt_contiguous", tile_config))


def k_grouped_gemm_nt_contiguous(a: torch.Tensor, b: torch.Tensor, k_ends: torch.Tensor,
                                 out_dtype: torch.dtype = torch.float32, *,
                                 tile_config: TileConfig | None = None) -> torch.Tensor:
    """Unscaled counterpart of k_grouped_fp8_gemm_nt_contiguous (any range boundaries)."""
    _check("k_grouped_gemm_nt_contiguous", a, None, b, None, 2, 2, ())
    _check_groups("k_grouped_gemm_nt_contiguous", "k_ends", k_ends)
    return _gemm_nt_op(a, b, None, None, k_ends.to(torch.int32), _K_GROUPED, k_ends.shape[0], out_dtype,
                       check_tile_config("k_grouped_gemm_nt_contiguous", tile_config))


def _check_indices(name: str, m_indices: torch.Tensor, m: int) -> None:
    if m_indices.shape != (m,) or m_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: m_indices must be an int tensor [{m}], got {tuple(m_indices.shape)} "
                         f"{m_indices.dtype}")


def _check_groups(name: str, what: str, t: torch.Tensor, g: int | None = None) -> None:
    """A per-group int tensor (masked_m, k_ends): [G] int32/int64. Shape only: its values stay on
    the device (no host sync); the kernel and the reference treat odd values alike."""
    if t.dim() != 1 or (g is not None and t.shape[0] != g) or t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: {what} must be an int tensor [{'G' if g is None else g}], got {tuple(t.shape)} "
                         f"{t.dtype}")


# ---------------------------------------------------------------------- the contiguous layout
def contiguous_layout(offs: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From leanmoe's grouped layout (rows sorted by group, offs [G] inclusive ends, M rows) to
    DeepGEMM's padded contiguous one, without a host sync: the padded row count is the static
    bound M + 127 G rounded to 128 (trailing tiles are all -1, skipped by the kernel).

    Returns pos [M] (where row i goes), m_indices [M_pad] (group per padded row, -1 = padding)
    and k_ends [G] (inclusive padded group ends, the K ranges of the weight-gradient GEMM)."""
    g = offs.shape[0]
    ends = offs.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + TILE - 1) // TILE * TILE
    pad_ends = padded.cumsum(0)
    group = torch.repeat_interleave(torch.arange(g, device=offs.device), counts, output_size=m)
    pos = torch.arange(m, device=offs.device) - (ends - counts)[group] + (pad_ends - padded)[group]
    m_pad = cdiv(m + (TILE - 1) * g, TILE) * TILE
    m_indices = torch.full((m_pad,), -1, dtype=torch.int32, device=offs.device)
    m_indices[pos] = group.to(torch.int32)
    return pos, m_indices, pad_ends.to(torch.int32)


def grouped_mm_contiguous(x_MK: torch.Tensor, w_GKN: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """leanmoe.kernels.grouped_gemm's forward contract on the bf16 kernel: x [M, K] sorted by
    group, w [G, K, N] (any strides), offs [G] inclusive ends -> y [M, N]. Rows are scattered into
    the 128-aligned layout and gathered back; no host sync (a GPU without torch._grouped_mm)."""
    pos, m_indices, _ = contiguous_layout(offs, x_MK.shape[0])
    x_pad = x_MK.new_zeros(m_indices.shape[0], x_MK.shape[1]).index_copy_(0, pos, x_MK)
    return m_grouped_bf16_gemm_nt_contiguous(x_pad, w_GKN.transpose(1, 2).contiguous(), m_indices)[pos]


def grouped_mm_wgrad_contiguous(x_MK: torch.Tensor, dy_MN: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Its weight gradient dw[g] = x_g^T dy_g -> [G, K, N] in x's dtype (0 for empty groups). The
    k-grouped kernel reduces over each group's rows directly: no padding needed."""
    return k_grouped_gemm_nt_contiguous(x_MK.t().contiguous(), dy_MN.t().contiguous(), offs, out_dtype=x_MK.dtype)
