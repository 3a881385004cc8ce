"""leanmoe.kernels.deep_gemm held to DeepGEMM's own test (deepseek-ai/DeepGEMM tests/test_fp8.py
with its input generators, tests/generators.py): the same reference math, re-derived here, and
the same calling code, `deep_gemm.<fn>(a, b, d, ...)`, the face imported in place of `deep_gemm`.
Small shapes on CPU: the torch reference, and the Triton kernels under the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton kernels run on CPU

import copy
import enum
import random

import pytest
import torch

import leanmoe.kernels.deep_gemm as deep_gemm
from leanmoe.kernels import dispatch
from leanmoe.kernels.deep_gemm import (align, calc_diff, ceil_div, get_mk_alignment_for_contiguous_layout,
                                       get_mn_major_tma_aligned_tensor, per_block_cast_to_fp8,
                                       per_channel_cast_to_fp8, per_token_cast_to_fp8)
from leanmoe.kernels.fp8 import per_block_dequant, per_token_dequant

needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="triton is not installed")
BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


@pytest.fixture(autouse=True)
def seeded():
    random.seed(0)
    torch.manual_seed(0)


class MajorTypeAB(enum.Enum):
    KMajor = 0
    MNMajor = 1

    def is_k_major(self) -> bool:
        return self is MajorTypeAB.KMajor


K, MN = MajorTypeAB.KMajor, MajorTypeAB.MNMajor


# ---------------------------------------------------------------------- inputs and references
def _as_major(x8, major: MajorTypeAB):
    """(data, sf) with the data stored MN-major when asked (the same logical [rows, K] tensor)."""
    return x8 if major.is_k_major() else (x8[0].T.contiguous().T, x8[1])


def generate_normal(m, n, k, major_a, major_b, accumulate, out_dtype, use_ue8m0, per_token_b=False):
    """ref_d = a @ b^T (+ c) from the unquantised operands; a cast per 1x128 tile, b per 128x128
    block (or 1x128 tile, the weight-gradient form)."""
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    d = torch.randn(m, n, dtype=out_dtype) * 32 if accumulate else torch.empty(m, n, dtype=out_dtype)
    c = d if accumulate else None
    ref_d = (a.float() @ b.float().T + (c if accumulate else 0)).to(out_dtype)
    a8 = per_token_cast_to_fp8(a, use_ue8m0=use_ue8m0)
    b8 = (per_token_cast_to_fp8 if per_token_b else per_block_cast_to_fp8)(b, use_ue8m0=use_ue8m0)
    return _as_major(a8, major_a), _as_major(b8, major_b), c, d, ref_d


def generate_m_grouped_contiguous(num_groups, expected_m_per_group, n, k, major_a, major_b, use_ue8m0):
    """Each group's rows padded to the alignment, padding rows marked -1; ref_d is a @ b[g]^T over
    each group's whole padded segment, zeroed on padding rows."""
    alignment = get_mk_alignment_for_contiguous_layout()
    actual = [int(expected_m_per_group * random.uniform(0.7, 1.3)) for _ in range(num_groups)]
    padded = [align(x, alignment) for x in actual]
    m = sum(padded)
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(num_groups, n, k, dtype=torch.bfloat16)
    m_indices = torch.full((m,), -1, dtype=torch.int32)
    ref_d = torch.empty(m, n, dtype=torch.bfloat16)
    start = 0
    for g, (rows, seg) in enumerate(zip(actual, padded)):
        m_indices[start:start + rows] = g
        ref_d[start:start + seg] = a[start:start + seg] @ b[g].T
        start += seg
    ref_d = torch.where((m_indices == -1)[:, None], torch.zeros_like(ref_d), ref_d)
    d = torch.empty(m, n, dtype=torch.bfloat16)
    assert major_a.is_k_major()
    b8 = _stack([per_block_cast_to_fp8(b[g], use_ue8m0=use_ue8m0) for g in range(num_groups)])
    b8 = b8 if major_b.is_k_major() else (b8[0].mT.contiguous().mT, b8[1])
    return m, per_token_cast_to_fp8(a, use_ue8m0=use_ue8m0), b8, m_indices, d, ref_d


def generate_m_grouped_masked(num_groups, max_m, expected_m_per_group, n, k, use_ue8m0):
    a = torch.randn(num_groups, max_m, k, dtype=torch.bfloat16)
    b = torch.randn(num_groups, n, k, dtype=torch.bfloat16)
    d = torch.empty(num_groups, max_m, n, dtype=torch.bfloat16)
    ref_d = torch.einsum("gmk,gnk->gmn", a.float(), b.float()).bfloat16()
    masked_m = torch.tensor([int(expected_m_per_group * random.uniform(0.7, 1.3)) for _ in range(num_groups)],
                            dtype=torch.int32)
    assert int(masked_m.max()) <= max_m
    a8 = [per_token_cast_to_fp8(a[g], use_ue8m0=use_ue8m0) for g in range(num_groups)]
    b8 = [per_block_cast_to_fp8(b[g], use_ue8m0=use_ue8m0) for g in range(num_groups)]
    return _stack(a8), _stack(b8), masked_m, d, ref_d


def _stack(pairs):
    return torch.stack([x for x, _ in pairs]), torch.stack([s for _, s in pairs])


def generate_k_grouped_contiguous(num_groups, m, n, major_a, major_b, ks, use_ue8m0):
    """Tokens are the reduction axis: a [sum_k, m], b [sum_k, n], cast per 128x1 tile; ref_d[g] =
    c[g] + a_g^T b_g, accumulated into d = c. K-major operands are DeepGEMM's SM90 layout: each
    group's [m, k_g] block flattened in turn, scales transposed to [m, sum_k / 128]."""
    assert get_mk_alignment_for_contiguous_layout() % 128 == 0
    k = sum(ks)
    a, b = torch.randn(k, m, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    c = torch.randn(num_groups, m, n) * 32
    d = c
    ref_d = torch.empty_like(c)
    start = 0
    for g, size in enumerate(ks):
        ref_d[g] = c[g] + a[start:start + size].float().T @ b[start:start + size].float()
        start += size
    a8, b8 = per_channel_cast_to_fp8(a, use_ue8m0=use_ue8m0), per_channel_cast_to_fp8(b, use_ue8m0=use_ue8m0)
    if (major_a, major_b) == (K, K):
        def flat(x8):
            blocks, start = [], 0
            for size in ks:
                blocks.append(x8[0][start:start + size].T.reshape(-1))
                start += size
            return torch.cat(blocks), x8[1].T
        a8, b8 = flat(a8), flat(b8)
    else:
        assert (major_a, major_b) == (MN, MN)
    return k, a8, b8, c, d, ref_d


# ---------------------------------------------------------------------- the upstream tests, CPU-sized
NORMAL = [  # m, n, k, major_a, major_b, accumulate, out_dtype, per-token b (1D1D weight gradient)
    (1, 200, 256, K, K, False, torch.bfloat16, False),
    (40, 130, 300, K, K, False, torch.bfloat16, False),
    (96, 64, 384, MN, MN, True, torch.float, True),
    (33, 72, 256, K, MN, False, torch.bfloat16, False),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("m,n,k,major_a,major_b,accumulate,out_dtype,per_token_b", NORMAL)
def test_gemm(m, n, k, major_a, major_b, accumulate, out_dtype, per_token_b, use_ue8m0, backend):
    major_opt = ("N" if major_a.is_k_major() else "T") + ("T" if major_b.is_k_major() else "N")
    disable_ue8m0_cast = not use_ue8m0
    for test_alias in (False, True):
        a, b, c, d, ref_d = generate_normal(m, n, k, major_a, major_b, accumulate, out_dtype, use_ue8m0, per_token_b)
        func_name = f'fp8_gemm_{major_opt.lower() if test_alias else "nt"}'
        if test_alias:
            a = a if major_a.is_k_major() else (a[0].T, a[1].T)
            b = b if major_b.is_k_major() else (b[0].T, b[1].T)
            assert a[0].is_contiguous() and b[0].is_contiguous()
        getattr(deep_gemm, func_name)(a, b, d, c=c, disable_ue8m0_cast=disable_ue8m0_cast)
        diff = calc_diff(d, ref_d)
        assert diff < 0.001, f"{m=}, {n=}, {k=}, {major_opt=}, {accumulate=}, {out_dtype=}, {diff:.5f}, {test_alias=}"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gemm_with_tma_aligned_scales(backend):
    # DeepGEMM v1's test hands the activation scales over MN-major and TMA-aligned
    a, b, _, d, ref_d = generate_normal(50, 96, 256, K, K, False, torch.bfloat16, use_ue8m0=False)
    a = (a[0], get_mn_major_tma_aligned_tensor(a[1]))
    assert a[1].stride() == (1, 52)
    deep_gemm.fp8_gemm_nt(a, b, d)
    assert calc_diff(d, ref_d) < 0.001


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("num_groups,expected_m_per_group,n,k", [(2, 40, 200, 256), (3, 100, 64, 384)])
@pytest.mark.parametrize("major_b", [K, MN])
def test_m_grouped_gemm_contiguous(num_groups, expected_m_per_group, n, k, major_b, backend):
    major_a = K
    major_opt = "N" + ("T" if major_b.is_k_major() else "N")
    for test_alias in (False, True):
        m, a, b, m_indices, d, ref_d = generate_m_grouped_contiguous(num_groups, expected_m_per_group, n, k, major_a,
                                                                     major_b, use_ue8m0=False)
        func_name = f"m_grouped_fp8_gemm_{(major_opt.lower() if test_alias else 'nt')}_contiguous"
        if test_alias:
            b = b if major_b.is_k_major() else (b[0].mT, b[1].mT)
            assert a[0].is_contiguous() and b[0].is_contiguous()
        getattr(deep_gemm, func_name)(a, b, d, m_indices, disable_ue8m0_cast=True)
        d = torch.where((m_indices == -1).unsqueeze(1), torch.zeros_like(d), d)
        diff = calc_diff(d, ref_d)
        assert diff < 0.001, f"{m=}, {n=}, {k=}, {major_opt}, {diff:.5f}, alias={test_alias}"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("num_groups,max_m,expected_m_per_group,n,k", [(2, 64, 40, 200, 256), (3, 32, 8, 64, 128)])
def test_m_grouped_gemm_masked(num_groups, max_m, expected_m_per_group, n, k, backend):
    for _ in range(2):
        a, b, masked_m, d, ref_d = generate_m_grouped_masked(num_groups, max_m, expected_m_per_group, n, k,
                                                             use_ue8m0=False)
        deep_gemm.m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m_per_group, disable_ue8m0_cast=True)
        for j in range(num_groups):
            diff = calc_diff(d[j, :masked_m[j].item()], ref_d[j, :masked_m[j].item()])
            assert diff < 0.001, f"{max_m=}, {n=}, {k=}, {j=}, masked_m={masked_m[j]}, {num_groups=}, {diff:.5f}"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("arch", [9, 10])  # DeepGEMM tests the K-major form on SM90, the MN-major one elsewhere
@pytest.mark.parametrize("num_groups,m,n,expected_k_per_group", [(3, 48, 40, 128), (2, 24, 72, 256)])
def test_k_grouped_gemm_contiguous(num_groups, m, n, expected_k_per_group, arch, backend):
    k_grouped_fp8_gemm_contiguous = deep_gemm.k_grouped_fp8_gemm_nt_contiguous if arch == 9 \
        else deep_gemm.k_grouped_fp8_gemm_tn_contiguous
    major_a = major_b = K if arch == 9 else MN
    ks = [align(int(expected_k_per_group * random.uniform(0.7, 1.3)), get_mk_alignment_for_contiguous_layout())
          for _ in range(num_groups)]
    for test_empty_groups in (False, True):
        new_ks = copy.deepcopy(ks)
        if test_empty_groups and len(ks) > 1:
            new_ks[random.randint(0, num_groups - 1)] = 0
        k, a, b, c, d, ref_d = generate_k_grouped_contiguous(num_groups, m, n, major_a, major_b, new_ks,
                                                             use_ue8m0=False)
        new_ks_tensor = torch.tensor(new_ks, dtype=torch.int)
        k_grouped_fp8_gemm_contiguous(a, b, d, new_ks, new_ks_tensor, c)
        diff = calc_diff(d, ref_d)
        assert diff < 0.001, f"{m=}, {n=}, {k=}, {ks=}, {diff:.5f}"


# ---------------------------------------------------------------------- utilities and limits
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_casts_match_deepgemm_shapes_and_round_trip(use_ue8m0):
    x = torch.randn(130, 300)
    y, s = per_token_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert y.shape == (130, 300) and s.shape == (130, 3)
    torch.testing.assert_close(per_token_dequant(y, s), x, rtol=0.07, atol=0.02)
    y, s = per_block_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert s.shape == (2, 3)
    torch.testing.assert_close(per_block_dequant(y, s), x, rtol=0.07, atol=0.05)
    x = torch.randn(256, 40)
    y, s = per_channel_cast_to_fp8(x, use_ue8m0=use_ue8m0)
    assert y.shape == (256, 40) and y.is_contiguous() and s.shape == (2, 40) and s.is_contiguous()
    torch.testing.assert_close(y.float() * s.repeat_interleave(128, dim=0), x, rtol=0.07, atol=0.02)
    if use_ue8m0:
        assert (torch.frexp(s).mantissa == 0.5).all()  # powers of two


def test_layout_helpers():
    assert get_mk_alignment_for_contiguous_layout() == deep_gemm.get_m_alignment_for_contiguous_layout() == 128
    assert deep_gemm.get_tma_aligned_size(5, 4) == 8 and deep_gemm.get_tma_aligned_size(16, 1) == 16
    assert ceil_div(129, 128) == 2 and align(129, 128) == 256
    sf = torch.randn(3, 5, 2)
    t = get_mn_major_tma_aligned_tensor(sf)
    assert t.shape == sf.shape and t.stride() == (16, 1, 8) and torch.equal(t, sf)
    assert get_mn_major_tma_aligned_tensor(t) is t  # already in the layout: no copy
    assert deep_gemm.get_col_major_tma_aligned_tensor is get_mn_major_tma_aligned_tensor


def test_unsupported_features_raise_not_implemented():
    a = per_token_cast_to_fp8(torch.randn(8, 128), use_ue8m0=False)
    b = per_block_cast_to_fp8(torch.randn(16, 128), use_ue8m0=False)
    d = torch.empty(8, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="FP4"):
        deep_gemm.fp8_gemm_nt((torch.zeros(8, 64, dtype=torch.int8), a[1]), b, d)
    with pytest.raises(NotImplementedError, match="packed UE8M0"):
        deep_gemm.fp8_gemm_nt((a[0], a[1].view(torch.int32)), b, d)
    with pytest.raises(NotImplementedError, match="recipe"):
        deep_gemm.fp8_gemm_nt(a, b, d, recipe=(1, 1, 32))
    with pytest.raises(NotImplementedError, match="PSUM"):
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a, (b[0][None], b[1][None]), d, torch.zeros(8, dtype=torch.int32),
                                                   use_psum_layout=True)
    with pytest.raises(NotImplementedError, match="gran_k"):
        per_token_cast_to_fp8(torch.randn(4, 64), use_ue8m0=True, gran_k=32)
    with pytest.raises(NotImplementedError, match="packed UE8M0"):
        per_token_cast_to_fp8(torch.randn(4, 128), use_ue8m0=True, use_packed_ue8m0=True)
    with pytest.raises(NotImplementedError, match="packed UE8M0"):
        deep_gemm.get_mn_major_tma_aligned_packed_ue8m0_tensor(a[1])


def test_bad_arguments_raise_value_error():
    a8 = per_channel_cast_to_fp8(torch.randn(256, 8), use_ue8m0=False)
    b8 = per_channel_cast_to_fp8(torch.randn(256, 4), use_ue8m0=False)
    d = torch.zeros(2, 8, 4)
    with pytest.raises(ValueError, match="sum to 384"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a8, b8, d, [128, 256], torch.tensor([128, 256], dtype=torch.int))
    with pytest.raises(ValueError, match="one size >= 0 per group"):
        deep_gemm.k_grouped_fp8_gemm_tn_contiguous(a8, b8, d, [256], torch.tensor([256], dtype=torch.int))
    with pytest.raises(ValueError, match="d must be bf16 or fp32"):
        a = per_token_cast_to_fp8(torch.randn(8, 128), use_ue8m0=False)
        deep_gemm.fp8_gemm_nt(a, per_block_cast_to_fp8(torch.randn(16, 128), use_ue8m0=False), torch.empty(8, 15))
    with pytest.raises(ValueError, match="multiple of 128"):
        per_channel_cast_to_fp8(torch.randn(100, 8), use_ue8m0=False)


def test_k_grouped_takes_sizes_not_ends():
    # the face's convention is DeepGEMM's (per-group sizes); leanmoe's own op takes cumulative ends
    torch.manual_seed(0)
    ks = [128, 256]
    a, b = torch.randn(384, 8), torch.randn(384, 4)
    d = torch.empty(2, 8, 4)
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(per_channel_cast_to_fp8(a, use_ue8m0=False),
                                               per_channel_cast_to_fp8(b, use_ue8m0=False), d, ks,
                                               torch.tensor(ks, dtype=torch.int))
    assert calc_diff(d[0], a[:128].T @ b[:128]) < 0.001 and calc_diff(d[1], a[128:].T @ b[128:]) < 0.001
