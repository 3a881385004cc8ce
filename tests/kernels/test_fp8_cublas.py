"""The cuBLAS backend of the FP8 GEMMs: what can be held on a CPU.

cuBLAS itself runs only on an sm_90 GPU (bench/gpu_check.py checks it there against the same
references). Here: the scale layouts it is handed hold leanmoe's values in the strides torch's
ScaledBlas.cpp asks for, the blockwise product those layouts describe is the reference's product,
and choosing the backend fails loudly where it cannot run.
"""

import pytest
import torch

from leanmoe.kernels import fp8_cublas, fp8_gemm
from leanmoe.kernels.fp8 import per_block_cast_to_fp8, per_token_cast_to_fp8
from leanmoe.kernels.fp8_cublas import cublas_scale_layouts
from leanmoe.kernels.fp8_gemm import (fp8_gemm_nt, k_grouped_fp8_gemm_nt_contiguous,
                                      m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)


def _blockwise_product(a8, scale_a, b8, scale_b, blocks: bool) -> torch.Tensor:
    """What cuBLAS computes from the layouts: sum over 128-wide K steps of the fp8 partial product
    times scale_a[m, step] and scale_b[step, n // 128] (blocks) or scale_b[n, step] (1x128 tiles)."""
    m, k = a8.shape
    n = b8.shape[0]
    out = torch.zeros(m, n)
    for kb in range(-(-k // 128)):
        part = a8[:, kb * 128:(kb + 1) * 128].float() @ b8[:, kb * 128:(kb + 1) * 128].float().T
        sb = scale_b[kb, torch.arange(n) // 128] if blocks else scale_b[:, kb]
        out += part * scale_a[:, kb, None] * sb[None, :]
    return out


@pytest.mark.parametrize("m,n,k", [(5, 256, 384), (130, 384, 200), (1, 128, 1000)])
def test_block_scale_layouts_hold_the_values_in_cublas_strides(m, n, k):
    a, b = torch.randn(m, k), torch.randn(n, k)
    (a8, sa), (b8, sb) = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)
    scale_a, scale_b, blocks = cublas_scale_layouts(sa, sb, n)
    kb, nb = -(-k // 128), -(-n // 128)
    kb4 = -(-kb // 4) * 4
    assert blocks
    assert scale_a.shape == (m, kb) and scale_a.stride() == (1, m) and torch.equal(scale_a, sa)
    assert scale_b.shape == (kb4, nb) and scale_b.stride() == (1, kb4)
    assert torch.equal(scale_b[:kb], sb.t()) and not scale_b[kb:].any()  # padding steps: zero
    ref = fp8_gemm._reference(fp8_gemm._PLAIN, a8, sa, b8, sb, None, 1, torch.float32)
    torch.testing.assert_close(_blockwise_product(a8, scale_a, b8, scale_b, True), ref, rtol=1e-5, atol=1e-4)


def test_tile_scale_layouts_for_the_weight_gradient():
    m, n, k = 96, 256, 640  # b = (x^T [N, T], 1x128 tiles along the token axis)
    a, b = torch.randn(m, k), torch.randn(n, k)
    (a8, sa), (b8, sb) = per_token_cast_to_fp8(a), per_token_cast_to_fp8(b)
    scale_a, scale_b, blocks = cublas_scale_layouts(sa, sb, n)
    assert not blocks
    assert scale_b.shape == (n, k // 128) and scale_b.stride() == (1, n) and torch.equal(scale_b, sb)
    ref = fp8_gemm._reference(fp8_gemm._PLAIN, a8, sa, b8, sb, None, 1, torch.float32)
    torch.testing.assert_close(_blockwise_product(a8, scale_a, b8, scale_b, False), ref, rtol=1e-5, atol=1e-4)


def test_cublas_backend_refuses_where_it_cannot_run(monkeypatch):
    a, b = torch.randn(4, 256), torch.randn(128, 256)
    qa, qb = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        fp8_gemm_nt(qa, qb, backend="cublas")
    with pytest.raises(ValueError, match="backend must be one of"):
        fp8_gemm_nt(qa, qb, backend="cutlass")
    monkeypatch.setenv("LEANMOE_FP8_GEMM", "fast")
    with pytest.raises(ValueError, match="LEANMOE_FP8_GEMM"):
        fp8_gemm_nt(qa, qb)
    monkeypatch.setenv("LEANMOE_FP8_GEMM", "cublas")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        m_grouped_fp8_gemm_nt_contiguous(qa, (qb[0][None], qb[1][None]), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        m_grouped_fp8_gemm_nt_masked((qa[0][None], qa[1][None]), (qb[0][None], qb[1][None]),
                                     torch.tensor([3], dtype=torch.int32))
    # "triton" and "auto" run everywhere (the reference on CPU); so does the k-grouped GEMM, which has no cuBLAS form
    for choice in ("triton", "auto"):
        monkeypatch.setenv("LEANMOE_FP8_GEMM", choice)
        assert torch.equal(fp8_gemm_nt(qa, qb), fp8_gemm_nt(qa, qb, backend="triton"))


def test_why_cublas_cannot_run_names_the_reason():
    a8 = torch.zeros(4, 256, dtype=torch.float8_e4m3fn)
    b8 = torch.zeros(128, 256, dtype=torch.float8_e4m3fn)
    sa = torch.ones(4, 2)
    why = fp8_cublas.cublas_fp8_unsupported
    assert "fp8 operands" in why(a8, b8, None, fp8_gemm._PLAIN)
    assert "k-grouped" in why(a8, b8, sa, fp8_cublas.K_GROUPED)
    assert "NVIDIA GPU" in why(a8, b8, sa, fp8_gemm._PLAIN)
    assert fp8_cublas._pick_backend("cublas", fp8_cublas.K_GROUPED, a8, b8, sa) == "triton"
    assert fp8_cublas._pick_backend("cublas", fp8_cublas.PLAIN, a8, b8, None) == "triton"


def test_k_grouped_ignores_the_backend_setting(monkeypatch):
    monkeypatch.setenv("LEANMOE_FP8_GEMM", "cublas")
    a, b = per_token_cast_to_fp8(torch.randn(8, 256)), per_token_cast_to_fp8(torch.randn(16, 256))
    out = k_grouped_fp8_gemm_nt_contiguous(a, b, torch.tensor([128, 256], dtype=torch.int32))
    assert out.shape == (2, 8, 16) and torch.isfinite(out).all()
