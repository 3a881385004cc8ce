"""The cuBLAS backend of leanmoe.kernels.fp8_gemm's FP8 GEMMs (Hopper), and how a call picks its backend.

cuBLAS has DeepSeek's recipe itself on sm_90 (cuBLASLt >= 12.9: 1x128 activation tiles with 128x128
or 1x128 weight scales, fp32 accumulation), reached through torch's `torch.nn.functional.scaled_mm`
(torch >= 2.10). The m-grouped layouts run it once per group. `backend=` (or LEANMOE_FP8_GEMM) picks
for the fp8 plain and m-grouped GEMMs: "triton", "cublas" (an error where it cannot run), or "auto"
(the default): the one measured faster on this device (`CUBLAS_AUTO_MIN_ROWS`). The k-grouped GEMM
and the bf16 kernels are Triton only. bench/gpu_check.py holds this backend to the same references
as the Triton kernel on a GPU; tests/kernels/test_fp8_cublas.py checks on CPU what can be checked
there (the scale layouts handed to cuBLAS, and the choice of backend).
"""

from __future__ import annotations

import os

import torch

from leanmoe.kernels.dispatch import cdiv

# fp8_gemm's modes (its kernel's MODE): plain, m-grouped contiguous, m-grouped masked, k-grouped
PLAIN, M_CONTIGUOUS, M_MASKED, K_GROUPED = 0, 1, 2, 3

FP8_GEMM_BACKENDS = ("auto", "triton", "cublas")


def cublas_fp8_unsupported(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor | None, mode: int) -> str | None:
    """None where the cuBLAS blockwise FP8 GEMM can run this call; otherwise why not."""
    if sa is None:
        return "the cuBLAS backend is for fp8 operands (bf16 calls run the Triton kernel)"
    if mode not in (PLAIN, M_CONTIGUOUS, M_MASKED):
        return "the k-grouped (weight-gradient) GEMM has no cuBLAS form here"
    if a.device.type != "cuda" or torch.version.hip is not None:
        return f"cuBLAS blockwise FP8 needs an NVIDIA GPU (tensor on {a.device})"
    major, minor = torch.cuda.get_device_capability(a.device)
    if (major, minor) != (9, 0):
        return f"cuBLAS blockwise FP8 runs on sm_90 (Hopper) only; this GPU is sm_{major}{minor}"
    if not hasattr(torch.nn.functional, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (torch >= 2.10)"
    k, n = a.shape[-1], b.shape[-2]
    if k % 16 or n % 16:
        return f"cuBLAS FP8 needs K and N multiples of 16 (K={k}, N={n})"
    return None


# "auto" takes cuBLAS from this many rows (per group for the m-grouped contiguous layout). Measured
# on an H200 (bench/kernels.py --only crossover, docs/benchmarks.md): at M = 4096 cuBLAS ran 1.19-1.58x
# bf16 at every DeepGEMM shape (Triton 0.59-0.88x), and 0.93-1.40x bf16 on 4-8 groups of 4096-8192
# rows (Triton 0.71-0.89x); from 16 to 2048 rows it mostly ran slower than Triton (M = 2048 with
# K = 7168 aside), and on 64 groups of 512-3072 rows 0.01-0.04x bf16 (a call per group). The masked
# layout stays on Triton (one cuBLAS call per group: 0.06-0.25x bf16).
CUBLAS_AUTO_MIN_ROWS = 4096


def _auto_cublas(mode: int, m: int, n_groups: int) -> bool:
    """Whether "auto" takes cuBLAS for a call it can run: the measured choice above."""
    if mode == PLAIN:
        return m >= CUBLAS_AUTO_MIN_ROWS
    if mode == M_CONTIGUOUS:
        return m >= CUBLAS_AUTO_MIN_ROWS * n_groups
    return False


def _backend_choice(backend: str | None) -> str:
    choice = backend or os.environ.get("LEANMOE_FP8_GEMM", "auto")
    if choice not in FP8_GEMM_BACKENDS:
        raise ValueError(f"fp8 GEMM backend must be one of {FP8_GEMM_BACKENDS}, got {choice!r} "
                         f"(argument backend= or LEANMOE_FP8_GEMM)")
    return choice


def _pick_backend(choice: str, mode: int, a, b, sa) -> str:
    """"triton" or "cublas" for one call, given the requested choice (see the module docstring)."""
    if choice == "triton" or sa is None or mode == K_GROUPED:  # bf16 and k-grouped calls: Triton only
        return "triton"
    why = cublas_fp8_unsupported(a, b, sa, mode)
    if choice == "cublas":
        if why:
            raise ValueError(f"fp8 GEMM backend 'cublas': {why}")
        return "cublas"
    return "cublas" if why is None and _auto_cublas(mode, a.shape[-2], b.shape[0]) else "triton"


def cublas_scale_layouts(sa: torch.Tensor, sb: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """leanmoe's scales -> the layouts cuBLAS reads (torch's checks in ScaledBlas.cpp):
    a's 1x128 tiles [M, Kb] with strides (1, M); b's 128x128 blocks [Nb, Kb] as [Kb4, Nb] with
    strides (1, Kb4), Kb4 = Kb rounded up to 4 (zero padded), or b's 1x128 tiles [N, Kb] with
    strides (1, N). -> (scale_a, scale_b, b_is_blocks). Values are unchanged: only the layout."""
    def strided(t: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
        # empty_strided keeps the strides even for a size-1 dimension, where .contiguous() would not
        return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)

    m, kb = sa.shape
    scale_a = strided(sa, (1, m))
    if sb.shape[0] == n and n > 1:  # 1x128 tiles (the weight-gradient operands), as in _launch
        return scale_a, strided(sb, (1, n)), False
    kb4 = cdiv(kb, 4) * 4
    if kb4 == kb:  # V3's K (512-16384) are multiples of 512: one copy
        return scale_a, strided(sb.t(), (1, kb)), True
    padded = torch.zeros(kb4 * sb.shape[0], dtype=sb.dtype, device=sb.device).as_strided((kb4, sb.shape[0]), (1, kb4))
    padded[:kb] = sb.t()  # the padding steps' scales stay 0
    return scale_a, padded, True


# cuBLAS refused (CUBLAS_STATUS_NOT_SUPPORTED) M = 1 and M = 129 on an H200 and ran M = 64, 128,
# 4096: a's rows are padded with zeros to a multiple of this
CUBLAS_M_ALIGN = 16


def _cublas_mm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """One plain GEMM a8 [M, K] @ b8 [N, K]^T on cuBLAS with DeepSeek's scales."""
    f = torch.nn.functional
    m = a8.shape[0]
    if m % CUBLAS_M_ALIGN:
        rows = cdiv(m, CUBLAS_M_ALIGN) * CUBLAS_M_ALIGN
        a8 = torch.cat([a8, a8.new_zeros(rows - m, a8.shape[1])])
        sa = torch.cat([sa, sa.new_zeros(rows - m, sa.shape[1])])
    scale_a, scale_b, blocks = cublas_scale_layouts(sa, sb, b8.shape[0])
    out = f.scaled_mm(a8, b8.t(), scale_a, f.ScalingType.BlockWise1x128, scale_b,
                      f.ScalingType.BlockWise128x128 if blocks else f.ScalingType.BlockWise1x128,
                      output_dtype=out_dtype)
    return out[:m] if out.shape[0] != m else out


def _cublas_call(mode: int, a, sa, b, sb, grp, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm's op for the plain and m-grouped modes on cuBLAS (same contract as its kernel)."""
    if a.shape[-2] == 0 or b.shape[-2] == 0:  # nothing to multiply: no cuBLAS call
        return torch.zeros(*a.shape[:-1], b.shape[-2], device=a.device, dtype=out_dtype)
    if mode == PLAIN:
        return _cublas_mm(a, sa, b, sb, out_dtype)
    if mode == M_MASKED:  # every group's M rows (no host sync), then rows past masked_m zeroed
        out = torch.empty(a.shape[0], a.shape[1], b.shape[1], device=a.device, dtype=out_dtype)
        for g in range(a.shape[0]):
            out[g] = _cublas_mm(a[g], sa[g], b[g], sb[g], out_dtype)
        rows = torch.arange(a.shape[1], device=a.device)
        return out.masked_fill_((rows[None, :] >= grp[:, None])[..., None], 0)
    # contiguous: one GEMM per run of equal group ids, read on the host (one sync per call)
    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=out_dtype)
    ids = grp.cpu()
    cuts = ((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist()
    for lo, hi in zip([0] + cuts, cuts + [ids.shape[0]]):
        g = int(ids[lo])
        if 0 <= g < b.shape[0]:
            out[lo:hi] = _cublas_mm(a[lo:hi], sa[lo:hi], b[g], sb[g], out_dtype)
        else:  # padding rows are written as zeros, as the kernel does
            out[lo:hi] = 0
    return out
