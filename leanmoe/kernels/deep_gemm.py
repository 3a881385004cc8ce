"""DeepGEMM's Python API (deepseek-ai/DeepGEMM v2, `import deep_gemm`) on leanmoe's kernels.

    import leanmoe.kernels.deep_gemm as deep_gemm        # instead of `import deep_gemm`
    deep_gemm.fp8_gemm_nt((a, sfa), (b, sfb), d, c=c)   # d = a @ b^T + c, written into d

DeepGEMM's conventions, kept here: the GEMMs write into the output tensor `d` and return None;
`c` (where DeepGEMM has it) is added in fp32 and may be `d` itself; scale factors are fp32
(1x128 tiles for activations, 128x128 blocks or 1x128 tiles for weights) in any strides,
including the MN-major TMA-aligned layout `get_mn_major_tma_aligned_tensor` makes. Shapes
(M rows of a, N rows of b, K the reduction axis, G groups, Kb = ceil(K / 128)):

    fp8_gemm_nt((a [M, K], sfa [M, Kb]), (b [N, K], sfb [Nb, Kb] | [N, Kb]), d [M, N], c=None)
        (and fp8_gemm_nn / _tn / _tt: the same with b [K, N] / a [K, M] and b [K, N] / a [K, M])
    m_grouped_fp8_gemm_nt_contiguous(a, (b [G, N, K], sfb [G, Nb, Kb]), d [M, N], m_indices [M])
        (and m_grouped_fp8_gemm_nn_contiguous with b [G, K, N])
    m_grouped_fp8_gemm_nt_masked((a [G, M, K], sfa [G, M, Kb]), b, d [G, M, N], masked_m [G], expected_m)
    k_grouped_fp8_gemm_tn_contiguous((a [sum_k, M], sfa [sum_k/128, M]), (b [sum_k, N], ...),
                                     d [G, M, N], ks, ks_tensor, c=None)
        d[g] = c[g] + a[Kg]^T @ b[Kg] over group g's rows Kg of the token axis. `ks` (a list of
        ints) and `ks_tensor` ([G] int) are the group *sizes*, DeepGEMM's convention (leanmoe's own
        k_grouped_fp8_gemm_nt_contiguous takes cumulative ends; this face converts on the device).
    k_grouped_fp8_gemm_nt_contiguous: the same with K-major operands, as DeepGEMM's SM90 form:
        a flat [sum_k * M] holding each group's [M, k_g] block in turn, sfa [M, sum_k/128].

Where leanmoe lacks what DeepGEMM offers, the call raises NotImplementedError naming it: FP4
operands, packed UE8M0 (int32) scale factors, granularities other than 128 (`recipe`), the
PSUM layout. Differences that give the same numbers: fp32 scales are used as given whatever
`disable_ue8m0_cast` says (as DeepGEMM does on SM90; pass power-of-two scales, use_ue8m0=True,
for Blackwell's numerics); `compiled_dims` and `expected_m` are tuning hints and are ignored;
rows DeepGEMM leaves unwritten (m_indices = -1, rows past masked_m) are written as zeros;
MN-major operands are copied to K-major first (one extra pass; leanmoe's kernels read K-major);
the m-grouped and k-grouped layouts need no 128 alignment (leanmoe.kernels.fp8_gemm). The
bf16, einsum, attention-logits and MegaMoE kernels of DeepGEMM have no counterpart here.

Dispatch is leanmoe's (leanmoe.kernels.dispatch): Triton on CUDA/ROCm, the torch reference on CPU.
"""

from __future__ import annotations

import torch

from leanmoe.kernels import fp8 as _fp8
from leanmoe.kernels import fp8_gemm as _gemm
from leanmoe.kernels.dispatch import cdiv
from leanmoe.kernels.fp8_gemm import calc_diff

__all__ = ["fp8_gemm_nt", "fp8_gemm_nn", "fp8_gemm_tn", "fp8_gemm_tt", "m_grouped_fp8_gemm_nt_contiguous",
           "m_grouped_fp8_gemm_nn_contiguous", "m_grouped_fp8_gemm_nt_masked", "k_grouped_fp8_gemm_tn_contiguous",
           "k_grouped_fp8_gemm_nt_contiguous", "per_token_cast_to_fp8", "per_block_cast_to_fp8",
           "per_channel_cast_to_fp8", "get_mk_alignment_for_contiguous_layout", "get_m_alignment_for_contiguous_layout",
           "get_k_alignment_for_contiguous_layout", "get_tma_aligned_size", "get_mn_major_tma_aligned_tensor",
           "get_col_major_tma_aligned_tensor", "get_mn_major_tma_aligned_packed_ue8m0_tensor",
           "transform_sf_into_required_layout", "ceil_div", "align", "calc_diff"]

GRAN = _fp8.TILE  # the one scale granularity leanmoe's kernels read (DeepGEMM's default, 128)


# ---------------------------------------------------------------------- argument checks
def _operand(name: str, pair, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 data, fp32 scales), or NotImplementedError for what leanmoe's kernels cannot read."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name}: {what} must be a pair (data, scale factors)")
    x, sf = pair
    if x.dtype in (torch.int8, torch.uint8) or "float4" in str(x.dtype):
        raise NotImplementedError(f"{name}: FP4 operands ({what}: {x.dtype}) are not supported by leanmoe; "
                                  f"cast to FP8 with per_token_cast_to_fp8 / per_block_cast_to_fp8")
    if sf.dtype in (torch.int32, torch.int64):
        raise NotImplementedError(f"{name}: packed UE8M0 scale factors ({what}: {sf.dtype}) are not supported by "
                                  f"leanmoe; pass fp32 scales (use_ue8m0=True gives power-of-two fp32 scales)")
    return x, sf


def _recipe(name: str, recipe, allowed: tuple[tuple[int, ...], ...]) -> None:
    if recipe is not None and tuple(recipe) not in allowed:
        raise NotImplementedError(f"{name}: recipe {tuple(recipe)} is not supported by leanmoe (its kernels read "
                                  f"scales at granularity 128: recipe {' or '.join(map(str, allowed))})")


def _no_psum(name: str, use_psum_layout: bool) -> None:
    if use_psum_layout:
        raise NotImplementedError(f"{name}: the PSUM layout (use_psum_layout=True) is not supported by leanmoe; "
                                  f"pass per-row m_indices / per-group sizes")


def _k_major(x: torch.Tensor) -> torch.Tensor:
    # NOTE: leanmoe's kernels read K-major operands; an MN-major one costs one transposing copy.
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _store(name: str, d: torch.Tensor, out: torch.Tensor, c: torch.Tensor | None = None) -> None:
    """d = out (+ c), in place. c may be d itself: the sum is formed before d is written."""
    if tuple(d.shape) != tuple(out.shape) or d.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: d must be bf16 or fp32 {tuple(out.shape)}, got {d.dtype} {tuple(d.shape)}")
    if c is not None:
        if c.shape != d.shape or c.dtype != d.dtype:
            raise ValueError(f"{name}: c must match d ({d.dtype} {tuple(d.shape)}), got {c.dtype} {tuple(c.shape)}")
        out = out.float() + c.float()
    d.copy_(out)


# ---------------------------------------------------------------------- normal GEMMs
def fp8_gemm_nt(a, b, d: torch.Tensor, c: torch.Tensor | None = None, recipe=None, compiled_dims: str = "nk",
                disable_ue8m0_cast: bool = False) -> None:
    """d [M, N] = a @ b^T (+ c). a = (a [M, K] e4m3, sfa [M, Kb]); b = (b [N, K] e4m3, sfb [Nb, Kb]
    per 128x128 block or [N, Kb] per 1x128 tile); d bf16 or fp32; c like d (may be d)."""
    name = "fp8_gemm_nt"
    (a8, sa), (b8, sb) = _operand(name, a, "a"), _operand(name, b, "b")
    _recipe(name, recipe, ((1, 128, 128), (1, 1, 128)))
    out = _gemm.fp8_gemm_nt((_k_major(a8), sa), (_k_major(b8), sb), out_dtype=d.dtype if c is None else torch.float32)
    _store(name, d, out, c)


# The aliases name each operand's storage as DeepGEMM does (BLAS-style, d = a @ b^T): for a, "n" is
# K-major [M, K] and "t" is a given as [K, M]; for b, "t" is K-major [N, K] and "n" is b given as
# [K, N]. Each takes its operands (data and scales) in that storage and views them back.
def fp8_gemm_nn(a, b, d, c=None, recipe=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """fp8_gemm_nt with b given as (b [K, N], sfb [Kb, Nb] | [Kb, N])."""
    fp8_gemm_nt(a, _t(b), d, c, recipe, compiled_dims, disable_ue8m0_cast)


def fp8_gemm_tn(a, b, d, c=None, recipe=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """fp8_gemm_nt with a given as (a [K, M], sfa [Kb, M]) and b as (b [K, N], sfb [Kb, Nb] | [Kb, N])."""
    fp8_gemm_nt(_t(a), _t(b), d, c, recipe, compiled_dims, disable_ue8m0_cast)


def fp8_gemm_tt(a, b, d, c=None, recipe=None, compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """fp8_gemm_nt with a given as (a [K, M], sfa [Kb, M])."""
    fp8_gemm_nt(_t(a), b, d, c, recipe, compiled_dims, disable_ue8m0_cast)


def _t(pair):
    """(x, sf) -> (x^T, sf^T) over the last two dims (views)."""
    return pair[0].transpose(-2, -1), pair[1].transpose(-2, -1)


# ---------------------------------------------------------------------- m-grouped GEMMs
def m_grouped_fp8_gemm_nt_contiguous(a, b, d: torch.Tensor, m_indices: torch.Tensor, recipe=None,
                                     compiled_dims: str = "nk", disable_ue8m0_cast: bool = False,
                                     use_psum_layout: bool = False) -> None:
    """d [M, N]: d[m] = a[m] @ b[m_indices[m]]^T. a = (a [M, K], sfa [M, Kb]); b = (b [G, N, K],
    sfb [G, Nb, Kb]); m_indices [M] int32, -1 for padding rows (written as 0)."""
    name = "m_grouped_fp8_gemm_nt_contiguous"
    _no_psum(name, use_psum_layout)
    (a8, sa), (b8, sb) = _operand(name, a, "a"), _operand(name, b, "b")
    _recipe(name, recipe, ((1, 128, 128),))
    out = _gemm.m_grouped_fp8_gemm_nt_contiguous((_k_major(a8), sa), (_k_major(b8), sb), m_indices,
                                                 out_dtype=d.dtype)
    _store(name, d, out)


def m_grouped_fp8_gemm_nn_contiguous(a, b, d, m_indices, recipe=None, compiled_dims: str = "nk",
                                     disable_ue8m0_cast: bool = False, use_psum_layout: bool = False) -> None:
    """m_grouped_fp8_gemm_nt_contiguous with b = (b [G, K, N], sfb [G, Kb, Nb])."""
    m_grouped_fp8_gemm_nt_contiguous(a, _t(b), d, m_indices, recipe, compiled_dims, disable_ue8m0_cast,
                                     use_psum_layout)


def m_grouped_fp8_gemm_nt_masked(a, b, d: torch.Tensor, masked_m: torch.Tensor, expected_m: int, recipe=None,
                                 compiled_dims: str = "nk", disable_ue8m0_cast: bool = False) -> None:
    """d [G, M, N]: d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g]^T (later rows 0). a = (a [G, M, K],
    sfa [G, M, Kb]); b = (b [G, N, K], sfb [G, Nb, Kb]); masked_m [G] int32 stays on the device."""
    name = "m_grouped_fp8_gemm_nt_masked"
    (a8, sa), (b8, sb) = _operand(name, a, "a"), _operand(name, b, "b")
    _recipe(name, recipe, ((1, 128, 128),))
    if expected_m <= 0:
        raise ValueError(f"{name}: expected_m must be positive, got {expected_m}")
    out = _gemm.m_grouped_fp8_gemm_nt_masked((_k_major(a8), sa), (_k_major(b8), sb), masked_m, expected_m,
                                             out_dtype=d.dtype)
    _store(name, d, out)


# ---------------------------------------------------------------------- k-grouped GEMMs
def _k_groups(name: str, ks, ks_tensor: torch.Tensor, d: torch.Tensor, sum_k: int) -> torch.Tensor:
    """DeepGEMM's group sizes -> leanmoe's inclusive cumulative ends, on the device (no sync)."""
    if d.dim() != 3:
        raise ValueError(f"{name}: d must be [G, M, N], got {tuple(d.shape)}")
    ks = [int(k) for k in ks]
    if len(ks) != d.shape[0] or tuple(ks_tensor.shape) != (d.shape[0],) or any(k < 0 for k in ks):
        raise ValueError(f"{name}: ks (a list) and ks_tensor ([G] int) must give one size >= 0 per group of d "
                         f"(G={d.shape[0]}), got {len(ks)} sizes and ks_tensor {tuple(ks_tensor.shape)}")
    if sum(ks) != sum_k:
        raise ValueError(f"{name}: the group sizes ks sum to {sum(ks)}, but the operands hold {sum_k} K rows")
    if ks_tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: ks_tensor must be int32, got {ks_tensor.dtype}")
    return ks_tensor.cumsum(0)


def k_grouped_fp8_gemm_tn_contiguous(a, b, d: torch.Tensor, ks, ks_tensor: torch.Tensor,
                                     c: torch.Tensor | None = None, recipe=(1, 1, 128), compiled_dims: str = "mn",
                                     use_psum_layout: bool = False) -> None:
    """d [G, M, N]: d[g] = a[Kg]^T @ b[Kg] (+ c[g]) over the K rows of group g. a = (a [sum_k, M]
    e4m3, sfa [ceil(sum_k/128), M] per 128x1 tile, as per_channel_cast_to_fp8 makes), b likewise
    with N; ks / ks_tensor the per-group sizes (sum = sum_k)."""
    name = "k_grouped_fp8_gemm_tn_contiguous"
    _no_psum(name, use_psum_layout)
    (a8, sa), (b8, sb) = _operand(name, a, "a"), _operand(name, b, "b")
    _recipe(name, recipe, ((1, 1, 128),))
    if a8.dim() != 2 or b8.dim() != 2:
        raise ValueError(f"{name}: a and b must be [sum_k, M] and [sum_k, N], got {tuple(a8.shape)} and "
                         f"{tuple(b8.shape)}")
    k_ends = _k_groups(name, ks, ks_tensor, d, a8.shape[0])
    out = _gemm.k_grouped_fp8_gemm_nt_contiguous((a8.t().contiguous(), sa.t()), (b8.t().contiguous(), sb.t()),
                                                 k_ends, out_dtype=torch.float32)
    _store(name, d, out, c)


def k_grouped_fp8_gemm_nt_contiguous(a, b, d: torch.Tensor, ks, ks_tensor: torch.Tensor,
                                     c: torch.Tensor | None = None, recipe=(1, 1, 128), compiled_dims: str = "mn",
                                     use_psum_layout: bool = False) -> None:
    """The K-major form (DeepGEMM's SM90 layout): a = (a flat [sum_k * M] holding each group's
    [M, k_g] block in turn, sfa [M, ceil(sum_k/128)]), b likewise with N; else as the tn form."""
    name = "k_grouped_fp8_gemm_nt_contiguous"
    _no_psum(name, use_psum_layout)
    (a8, sa), (b8, sb) = _operand(name, a, "a"), _operand(name, b, "b")
    _recipe(name, recipe, ((1, 1, 128),))
    ks_list = [int(k) for k in ks]
    sum_k = sum(ks_list)
    k_ends = _k_groups(name, ks_list, ks_tensor, d, sum_k)
    m, n = d.shape[1:]
    if a8.numel() != sum_k * m or b8.numel() != sum_k * n:
        raise ValueError(f"{name}: a and b must hold sum(ks) * M = {sum_k * m} and sum(ks) * N = {sum_k * n} "
                         f"elements, got {a8.numel()} and {b8.numel()}")
    out = _gemm.k_grouped_fp8_gemm_nt_contiguous((_unflatten_k_groups(a8, m, ks_list), sa),
                                                 (_unflatten_k_groups(b8, n, ks_list), sb), k_ends,
                                                 out_dtype=torch.float32)
    _store(name, d, out, c)


def _unflatten_k_groups(flat: torch.Tensor, rows: int, ks: list[int]) -> torch.Tensor:
    """flat [sum_k * rows] of per-group [rows, k] blocks -> [rows, sum_k] (K-major, one copy)."""
    blocks, off = [], 0
    for k in ks:
        blocks.append(flat.reshape(-1)[off: off + rows * k].view(rows, k))
        off += rows * k
    return torch.cat(blocks, dim=1) if blocks else flat.new_empty(rows, 0)


# ---------------------------------------------------------------------- casts (deep_gemm.utils)
def _gran(name: str, gran_k: int, use_packed_ue8m0: bool = False) -> None:
    if gran_k != GRAN:
        raise NotImplementedError(f"{name}: gran_k={gran_k} is not supported by leanmoe (its kernels read 128)")
    if use_packed_ue8m0:
        raise NotImplementedError(f"{name}: packed UE8M0 scales (use_packed_ue8m0=True) are not supported by leanmoe")


def per_token_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128,
                          use_packed_ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_fp8 [M, K] e4m3, sf [M, ceil(K/128)] fp32), one scale per 1x128 tile."""
    _gran("per_token_cast_to_fp8", gran_k, use_packed_ue8m0)
    return _fp8.per_token_cast_to_fp8(x, use_ue8m0)


def per_block_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] -> (x_fp8 [N, K] e4m3, sf [ceil(N/128), ceil(K/128)] fp32), one scale per 128x128 block."""
    _gran("per_block_cast_to_fp8", gran_k)
    return _fp8.per_block_cast_to_fp8(x, use_ue8m0)


def per_channel_cast_to_fp8(x: torch.Tensor, use_ue8m0: bool, gran_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K, M] with K a multiple of 128 -> (x_fp8 [K, M] e4m3, sf [K/128, M] fp32), one scale per
    128x1 tile (the k-grouped operands: tokens are the reduction axis)."""
    _gran("per_channel_cast_to_fp8", gran_k)
    if x.dim() != 2 or x.shape[0] % GRAN:
        raise ValueError(f"per_channel_cast_to_fp8: x must be [K, M] with K a multiple of {GRAN}, got "
                         f"{tuple(x.shape)}")
    y, sf = _fp8.per_token_cast_to_fp8(x.t(), use_ue8m0)  # [M, K], [M, K/128]: the same tiles, transposed
    return y.t().contiguous(), sf.t().contiguous()


# ---------------------------------------------------------------------- layout helpers
def ceil_div(x: int, y: int) -> int:
    return cdiv(x, y)


def align(x: int, y: int) -> int:
    return cdiv(x, y) * y


def get_mk_alignment_for_contiguous_layout() -> int:
    """Rows (m-grouped) or K rows (k-grouped) per group are padded to a multiple of this: 128.
    leanmoe's kernels are correct at any alignment; aligned groups are the fast case."""
    return _gemm.get_m_alignment_for_contiguous_layout()


get_m_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout
get_k_alignment_for_contiguous_layout = get_mk_alignment_for_contiguous_layout


def get_tma_aligned_size(mn: int, element_size: int) -> int:
    """mn rounded up so mn elements of element_size bytes fill a multiple of 16 bytes (TMA's rule)."""
    if 16 % element_size:
        raise ValueError(f"get_tma_aligned_size: element_size must divide 16, got {element_size}")
    return align(mn, 16 // element_size)


def get_mn_major_tma_aligned_tensor(sf: torch.Tensor) -> torch.Tensor:
    """sf [(G,) MN, Kb] -> the same values MN-major with the MN stride padded to
    get_tma_aligned_size (what DeepGEMM's kernels load). Returned as is when already so."""
    if sf.dim() not in (2, 3):
        raise ValueError(f"get_mn_major_tma_aligned_tensor: sf must be 2-D or 3-D, got {tuple(sf.shape)}")
    mn, kb = sf.shape[-2:]
    aligned = get_tma_aligned_size(mn, sf.element_size())
    if sf.stride(-2) == 1 and sf.stride(-1) == aligned and (sf.dim() == 2 or sf.stride(0) == aligned * kb):
        return sf
    lead = sf.shape[:-2]
    out = torch.empty(*lead, kb, aligned, device=sf.device, dtype=sf.dtype).transpose(-2, -1)[..., :mn, :]
    return out.copy_(sf)


get_col_major_tma_aligned_tensor = get_mn_major_tma_aligned_tensor  # DeepGEMM v1's name


def get_mn_major_tma_aligned_packed_ue8m0_tensor(sf: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("get_mn_major_tma_aligned_packed_ue8m0_tensor: packed UE8M0 scale factors (Blackwell) "
                              "are not supported by leanmoe; its kernels read fp32 scales as they are")


def transform_sf_into_required_layout(sf: torch.Tensor, mn: int, k: int, recipe, num_groups: int | None = None,
                                      is_sfa: bool = False, disable_ue8m0_cast: bool = False) -> torch.Tensor:
    """leanmoe's kernels read fp32 scales in any strides: the layout DeepGEMM needs is the TMA-aligned one."""
    _recipe("transform_sf_into_required_layout", recipe, ((1, 128, 128), (1, 1, 128), (128, 128), (1, 128)))
    if sf.dtype != torch.float32:
        raise NotImplementedError(f"transform_sf_into_required_layout: {sf.dtype} scale factors are not supported "
                                  f"by leanmoe (fp32 only)")
    return get_mn_major_tma_aligned_tensor(sf)
