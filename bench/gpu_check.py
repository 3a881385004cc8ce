"""Correctness of every leanmoe Triton kernel *compiled for a GPU*, against its torch reference.

The test suite holds the kernels to their references under Triton's CPU interpreter (CI has no
GPU). Compiled code can differ from interpreted code (tile layouts, MMA instructions, fp8
conversion, masking), so on a CUDA machine run this once after changing a kernel:

    python bench/gpu_check.py              # CUDA: compiled kernels, DeepSeek-V3 shapes
    python bench/gpu_check.py --device cpu # the same checks under the interpreter, small shapes
    python bench/gpu_check.py --only cublas mla   # some groups only

Each check prints one line (PASS/FAIL with the measured error and its bound); the exit status is
1 if any check failed. Bounds are the test suite's: DeepGEMM's calc_diff < 1e-3 for FP8 GEMMs
against the unquantised product, and closeness to the dequantise-then-fp32 reference; bit
equality for the casts; FlashMLA-style decode checks with NaN in every unused cache slot.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["LEANMOE_TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from leanmoe.kernels import fp8_cublas, fp8_gemm  # noqa: E402
from leanmoe.kernels.fp8 import (per_block_cast_to_fp8_reference, per_block_cast_triton,  # noqa: E402
                                 per_token_cast_to_fp8_reference, per_token_cast_triton)
from leanmoe.kernels.fp8_gemm import (calc_diff, contiguous_layout, fp8_gemm_nt, grouped_mm_contiguous,  # noqa: E402
                                      grouped_mm_wgrad_contiguous, k_grouped_fp8_gemm_nt_contiguous,
                                      m_grouped_bf16_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_contiguous,
                                      m_grouped_fp8_gemm_nt_masked)
from leanmoe.kernels.grouped_gemm import grouped_mm, grouped_mm_reference  # noqa: E402
from leanmoe.kernels.mla_decode import mla_decode_reference, mla_decode_triton  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def guarded(fn):
    """Run one group of checks; an exception is a FAIL of the group, and the others still run."""
    def run(*args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported, counted as a failure
            check(fn.__name__, False, f"raised {type(e).__name__}: {e}")
            traceback.print_exc()
    return run


def _same_cast(got, x, ref_fn, ue8m0) -> tuple[bool, str]:
    """Bit equality with the reference computed on the CPU (the documented one: torch's CUDA
    division by a scalar multiplies by its reciprocal, so a CUDA run of the reference itself can
    differ from it in the last bit of a scale)."""
    y, s = got
    yr, sr = ref_fn(x.cpu(), ue8m0)
    bad = (y.cpu().view(torch.uint8) != yr.view(torch.uint8)).sum().item()
    bad_s = (s.cpu() != sr).sum().item()
    return bad == 0 and bad_s == 0, "bit-equal" if bad == bad_s == 0 else f"{bad} fp8 and {bad_s} scale mismatches"


@guarded
def casts(dev, shapes):
    for m, k in shapes:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16) * 3
        x[0, :5] = 0  # a partly zero tile
        for ue8m0 in (False, True):
            check(f"per_token_cast {m}x{k} ue8m0={ue8m0}",
                  *_same_cast(per_token_cast_triton(x, ue8m0), x, per_token_cast_to_fp8_reference, ue8m0))
            check(f"per_token_cast (transposed, strided) {k}x{m} ue8m0={ue8m0}",
                  *_same_cast(per_token_cast_triton(x.t(), ue8m0), x.t(), per_token_cast_to_fp8_reference, ue8m0))
            w = x[None].repeat(2, 1, 1)
            w[1] *= 0.01
            check(f"per_block_cast 2x{m}x{k} ue8m0={ue8m0}",
                  *_same_cast(per_block_cast_triton(w, ue8m0), w, per_block_cast_to_fp8_reference, ue8m0))


def _close_to_reference(name, out, ref, exact_bound=1e-5):
    d = calc_diff(out.float(), ref.float())
    finite = bool(torch.isfinite(out.float()).all())
    check(name, finite and d < exact_bound, f"calc_diff vs dequantised fp32 reference {d:.2e} (< {exact_bound:g})"
          + ("" if finite else ", NON-FINITE output"))


@guarded
def dense_fp8(dev, shapes):
    for m, n, k in shapes:
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        qa, qb = per_token_cast_to_fp8_reference(a), per_block_cast_to_fp8_reference(b)
        out = fp8_gemm_nt(qa, qb)
        d = calc_diff(out, a.float() @ b.float().T)
        check(f"fp8_gemm_nt {m}x{n}x{k} vs bf16 product", d < 1e-3, f"calc_diff {d:.2e} (< 1e-3)")
        ref = fp8_gemm._reference(fp8_gemm._PLAIN, qa[0], qa[1], qb[0], qb[1], None, 1, torch.float32)
        _close_to_reference(f"fp8_gemm_nt {m}x{n}x{k}", out, ref)
        _close_to_reference(f"fp8_gemm_nt split_k=4 {m}x{n}x{k}", fp8_gemm_nt(qa, qb, split_k=4), ref)
        # per-row (1x128) b scales and fp32 output: the weight-gradient form
        qb_rows = per_token_cast_to_fp8_reference(b)
        out = fp8_gemm_nt(qa, qb_rows, out_dtype=torch.float32)
        _close_to_reference(f"fp8_gemm_nt 1x128 b scales fp32 out {m}x{n}x{k}", out, fp8_gemm._reference(
            fp8_gemm._PLAIN, qa[0], qa[1], qb_rows[0], qb_rows[1], None, 1, torch.float32))


@guarded
def grouped_fp8(dev, counts_list, n, k):
    for counts in counts_list:
        g = len(counts)
        offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
        m = int(offs[-1])
        pos, m_indices, k_ends = contiguous_layout(offs, m)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        x_pad = x.new_zeros(m_indices.shape[0], k).index_copy(0, pos, x)
        w = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16)
        qx, qw = per_token_cast_to_fp8_reference(x_pad), per_block_cast_to_fp8_reference(w)
        out = m_grouped_fp8_gemm_nt_contiguous(qx, qw, m_indices)
        ref = fp8_gemm._reference(fp8_gemm._M_CONTIGUOUS, qx[0], qx[1], qw[0], qw[1], m_indices, 1, torch.float32)
        _close_to_reference(f"m_grouped_fp8_contiguous counts={counts} n={n} k={k}", out, ref)
        pad_rows = m_indices < 0
        check(f"m_grouped_fp8_contiguous padding rows zero counts={counts}", bool((out[pad_rows] == 0).all()), "")
        unq = torch.cat([x[s:e].float() @ w[i].float().T for i, (s, e) in
                         enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
        d = calc_diff(out[pos], unq)
        check(f"m_grouped_fp8_contiguous vs bf16 product counts={counts}", d < 1e-3, f"calc_diff {d:.2e} (< 1e-3)")
        outb = m_grouped_bf16_gemm_nt_contiguous(x_pad, w, m_indices)
        d = calc_diff(outb[pos], unq)
        check(f"m_grouped_bf16_contiguous counts={counts}", d < 1e-5, f"calc_diff {d:.2e} (< 1e-5)")
        # weight gradient: k-grouped over the padded token axis
        dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        dy_pad = dy.new_zeros(m_indices.shape[0], n).index_copy(0, pos, dy)
        qdy_t, qx_t = per_token_cast_to_fp8_reference(dy_pad.t()), per_token_cast_to_fp8_reference(x_pad.t())
        dw = k_grouped_fp8_gemm_nt_contiguous(qdy_t, qx_t, k_ends)
        ref = fp8_gemm._reference(fp8_gemm._K_GROUPED, qdy_t[0], qdy_t[1], qx_t[0], qx_t[1], k_ends, g,
                                  torch.float32)
        _close_to_reference(f"k_grouped_fp8 (wgrad) counts={counts}", dw, ref)


@guarded
def unaligned_grouped(dev, counts, n, k):
    """The layouts DeepGEMM requires aligned, which leanmoe's kernels run too: groups packed with
    no padding (a 128-row tile holds several groups; K ranges start mid-tile), against the
    reference (the two once disagreed: zeros for shared tiles, a neighbour's scale mid-tile)."""
    g = len(counts)
    offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    m_indices = torch.repeat_interleave(torch.arange(g, device=dev), torch.tensor(counts, device=dev)).to(torch.int32)
    m = m_indices.shape[0]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16)
    qx, qw = per_token_cast_to_fp8_reference(x), per_block_cast_to_fp8_reference(w)
    out = m_grouped_fp8_gemm_nt_contiguous(qx, qw, m_indices)
    ref = fp8_gemm._reference(fp8_gemm._M_CONTIGUOUS, qx[0], qx[1], qw[0], qw[1], m_indices, 1, torch.float32)
    _close_to_reference(f"m_grouped_fp8_contiguous unpadded counts={counts}", out, ref)
    outb = m_grouped_bf16_gemm_nt_contiguous(x, w, m_indices)
    d = calc_diff(outb, torch.einsum("mk,mnk->mn", x.float(), w.float()[m_indices.long()]))
    check(f"m_grouped_bf16_contiguous unpadded counts={counts}", d < 1e-5, f"calc_diff {d:.2e} (< 1e-5)")
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    qdy_t, qx_t = per_token_cast_to_fp8_reference(dy.t()), per_token_cast_to_fp8_reference(x.t())
    dw = k_grouped_fp8_gemm_nt_contiguous(qdy_t, qx_t, offs)
    ref = fp8_gemm._reference(fp8_gemm._K_GROUPED, qdy_t[0], qdy_t[1], qx_t[0], qx_t[1], offs, g, torch.float32)
    _close_to_reference(f"k_grouped_fp8 (wgrad) unpadded counts={counts}", dw, ref)


@guarded
def faces(dev, m, n, k):
    """leanmoe.kernels.deep_gemm and .flash_mla: DeepGEMM's and FlashMLA's calling conventions."""
    from leanmoe.kernels import deep_gemm, flash_mla

    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    c = torch.randn(m, n, device=dev) * 32
    d = c.clone()
    deep_gemm.fp8_gemm_nt(deep_gemm.per_token_cast_to_fp8(a, use_ue8m0=False),
                          deep_gemm.per_block_cast_to_fp8(b, use_ue8m0=False), d, c=d)
    dd = calc_diff(d, c + a.float() @ b.float().T)
    check(f"deep_gemm.fp8_gemm_nt d = c + a b^T {m}x{n}x{k}", dd < 1e-3, f"calc_diff {dd:.2e} (< 1e-3)")
    ks = [256, 0, 384, 128]
    x, y = torch.randn(sum(ks), m, device=dev, dtype=torch.bfloat16), torch.randn(sum(ks), n, device=dev,
                                                                                   dtype=torch.bfloat16)
    d = torch.randn(len(ks), m, n, device=dev) * 32  # accumulated into, as DeepGEMM's test does
    ends = torch.tensor(ks).cumsum(0).tolist()
    ref = d + torch.stack([x[e - s:e].float().T @ y[e - s:e].float() for s, e in zip(ks, ends)])
    deep_gemm.k_grouped_fp8_gemm_tn_contiguous(deep_gemm.per_channel_cast_to_fp8(x, use_ue8m0=False),
                                               deep_gemm.per_channel_cast_to_fp8(y, use_ue8m0=False), d, ks,
                                               torch.tensor(ks, device=dev, dtype=torch.int32), d)
    dd = calc_diff(d, ref)
    check(f"deep_gemm.k_grouped_fp8_gemm_tn_contiguous ks={ks}", dd < 1e-3, f"calc_diff {dd:.2e} (< 1e-3)")
    seqlens = torch.tensor([0, 70, 200], device=dev, dtype=torch.int32)
    kv = torch.randn(12, 64, 1, 576, device=dev, dtype=torch.bfloat16)
    table = torch.randperm(12, device=dev)[:12].view(3, 4).to(torch.int32)
    q = torch.randn(3, 2, 16, 576, device=dev, dtype=torch.bfloat16)
    meta, splits = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q, kv, table, seqlens, 512, meta, splits, causal=True)
    ref, ref_lse = mla_decode_reference(q, kv, table, seqlens, 512, causal=True)
    empty_ok = bool((lse[0] == float("inf")).all() and (out[0] == 0).all())
    ok = empty_ok and torch.allclose(lse[1:], ref_lse[1:], atol=1e-2)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    check("flash_mla.flash_mla_with_kvcache (empty sequence: out 0, lse +inf)", ok and err < 1e-2,
          f"rel err {err:.2e} (< 1e-2)")


def _masked_case(dev, g, m, n, k, backend=None, bound=1e-5):
    a = torch.randn(g, m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16)
    qa = per_token_cast_to_fp8_reference(a.view(g * m, k))
    qa = (qa[0].view(g, m, k), qa[1].view(g, m, -1))
    qw = per_block_cast_to_fp8_reference(w)
    masked_m = torch.randint(0, m + 1, (g,), device=dev, dtype=torch.int32)
    masked_m[0] = m
    out = m_grouped_fp8_gemm_nt_masked(qa, qw, masked_m, m, backend=backend)
    ref = fp8_gemm._reference(fp8_gemm._M_MASKED, qa[0], qa[1], qw[0], qw[1], masked_m, g, torch.float32)
    _close_to_reference(f"{'cuBLAS ' if backend == 'cublas' else ''}m_grouped_fp8_masked g={g} m={m} n={n} k={k} "
                        f"masked_m={masked_m.tolist()}", out, ref, bound)


@guarded
def masked_fp8(dev, g, m, n, k):
    _masked_case(dev, g, m, n, k)


@guarded
def cublas_fp8(dev, big: bool):
    """The cuBLAS backend (sm_90: torch.nn.functional.scaled_mm with DeepSeek's 1x128 / 128x128
    scales) against the same references as the Triton kernels."""
    why = fp8_cublas.cublas_fp8_unsupported(torch.empty(1, 16, device=dev, dtype=torch.float8_e4m3fn),
                                          torch.empty(16, 16, device=dev), torch.empty(1, 1, device=dev), 0)
    if why:
        print(f"NOTE  cuBLAS backend not checked: {why}")
        return
    if not _cublas_layouts_run(dev):
        return
    for m, n, k in ([(1, 2112, 7168), (64, 24576, 1536), (4096, 7168, 2048), (129, 256, 384)] if big
                    else [(3, 128, 256)]):
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        qa, qb, qb_rows = (per_token_cast_to_fp8_reference(a), per_block_cast_to_fp8_reference(b),
                           per_token_cast_to_fp8_reference(b))
        for what, qbb in (("128x128 b scales", qb), ("1x128 b scales", qb_rows)):
            for out_dtype in (torch.bfloat16, torch.float32):
                name = f"cuBLAS fp8_gemm_nt {what} {str(out_dtype)[6:]} out {m}x{n}x{k}"
                try:
                    out = fp8_gemm_nt(qa, qbb, out_dtype=out_dtype, backend="cublas")
                except Exception as e:  # noqa: BLE001 - which recipe / dtype cuBLAS refuses is the finding
                    check(name, False, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                _close_to_reference(name, out, fp8_gemm._reference(
                    fp8_gemm._PLAIN, qa[0], qa[1], qbb[0], qbb[1], None, 1, torch.float32),
                    1e-5 if out_dtype == torch.float32 else 2e-5)
    g, n, k = (5, 4096, 7168) if big else (3, 128, 256)
    counts = [0, 5, 300, 128, 77] if big else [0, 5, 130]
    offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    for padded in (True, False):
        pos, m_indices, _ = contiguous_layout(offs, int(offs[-1]))
        if not padded:
            m_indices = torch.repeat_interleave(torch.arange(len(counts), device=dev, dtype=torch.int32),
                                                torch.tensor(counts, device=dev))
        x = torch.randn(m_indices.shape[0], k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(len(counts), n, k, device=dev, dtype=torch.bfloat16)
        qx, qw = per_token_cast_to_fp8_reference(x), per_block_cast_to_fp8_reference(w)
        out = m_grouped_fp8_gemm_nt_contiguous(qx, qw, m_indices, backend="cublas")
        ref = fp8_gemm._reference(fp8_gemm._M_CONTIGUOUS, qx[0], qx[1], qw[0], qw[1], m_indices, 1, torch.float32)
        _close_to_reference(f"cuBLAS m_grouped_contiguous {'padded' if padded else 'unpadded'} counts={counts}",
                            out, ref, 2e-5)
        check(f"cuBLAS m_grouped_contiguous padding rows zero ({'padded' if padded else 'unpadded'})",
              bool((out[m_indices < 0] == 0).all()), "")
    _masked_case(dev, *((8, 256) if big else (3, 32)), n, k, backend="cublas", bound=2e-5)


def _cublas_layouts_run(dev) -> bool:
    """Whether scaled_mm takes leanmoe's scale layouts; if not, which layouts it takes (printed,
    to fix `cublas_scale_layouts` from)."""
    f = torch.nn.functional
    m, n, k = 256, 384, 512
    a8 = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
    b8 = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn)
    sa = torch.rand(m, k // 128, device=dev) + 0.5
    sb = torch.rand(n // 128, k // 128, device=dev) + 0.5
    try:
        scale_a, scale_b, _ = fp8_cublas.cublas_scale_layouts(sa, sb, n)
        f.scaled_mm(a8, b8.t(), scale_a, f.ScalingType.BlockWise1x128, scale_b, f.ScalingType.BlockWise128x128,
                    output_dtype=torch.bfloat16)
        check("cuBLAS scale layouts accepted by scaled_mm", True, "")
        return True
    except Exception as e:  # noqa: BLE001
        check("cuBLAS scale layouts accepted by scaled_mm", False, f"{type(e).__name__}: {str(e).splitlines()[0]}")
    a_variants = {"(1,M)": sa.t().contiguous().t(), "contiguous": sa}
    b_variants = {"[Kb,Nb] contiguous": sb.t().contiguous(), "[Kb,Nb] strides (1,Kb)": sb.t(),
                  "[Nb,Kb] contiguous": sb}
    for an, sa_ in a_variants.items():
        for bn, sb_ in b_variants.items():
            for api in ("F.scaled_mm", "torch._scaled_mm"):
                try:
                    if api == "F.scaled_mm":
                        f.scaled_mm(a8, b8.t(), sa_, f.ScalingType.BlockWise1x128, sb_,
                                    f.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
                    else:
                        torch._scaled_mm(a8, b8.t(), sa_, sb_, out_dtype=torch.bfloat16)
                    print(f"  layout OK: {api} scale_a {an}, scale_b {bn}")
                except Exception as e:  # noqa: BLE001
                    print(f"  layout refused: {api} scale_a {an}, scale_b {bn}: {str(e).splitlines()[0][:150]}")
    return False


@guarded
def grouped_bf16(dev, counts, k, n):
    offs = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
    m = int(offs[-1])
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(len(counts), k, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ref = grouped_mm_reference(x.float(), w.float(), offs)
    y = grouped_mm_contiguous(x.detach(), w.detach(), offs)
    d = calc_diff(y, ref)
    check(f"grouped_mm on the Triton bf16 kernel counts={counts}", d < 1e-5, f"calc_diff {d:.2e} (< 1e-5)")
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    dw = grouped_mm_wgrad_contiguous(x.detach(), dy, offs)
    dw_ref = torch.stack([x.detach().float()[s:e].T @ dy.float()[s:e]
                          for s, e in zip([0] + offs[:-1].tolist(), offs.tolist())])
    d = calc_diff(dw, dw_ref)
    check(f"grouped_mm weight gradient on the Triton kernel counts={counts}", d < 1e-5, f"calc_diff {d:.2e} (< 1e-5)")
    y = grouped_mm(x, w, offs)  # the dispatch point (torch._grouped_mm where it runs) with autograd
    y.backward(dy)
    ref_x, ref_w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    grouped_mm_reference(ref_x, ref_w, offs).backward(dy.float())
    dd = max(calc_diff(y, ref), calc_diff(x.grad, ref_x.grad), calc_diff(w.grad, ref_w.grad))
    check(f"grouped_mm dispatch forward+backward counts={counts}", dd < 1e-5, f"max calc_diff {dd:.2e} (< 1e-5)")


@guarded
def mla(dev, cases):
    for b, s_q, h_q, d, dv, bs, max_len, causal, dtype in cases:
        seqlens = torch.randint(s_q, max_len + 1, (b,), device=dev, dtype=torch.int32)
        seqlens[0] = max_len
        n_per = -(-max_len // bs)
        n_blocks = b * n_per + 3
        kv = torch.full((n_blocks, bs, 1, d), float("nan"), device=dev, dtype=dtype)
        table = torch.randperm(n_blocks, device=dev)[: b * n_per].view(b, n_per).to(torch.int32)
        for i, n in enumerate(seqlens.tolist()):  # fill only the valid slots; the rest stays NaN
            blocks = table[i, : -(-n // bs)].long()
            flat = torch.randn(len(blocks) * bs, d, device=dev, dtype=dtype)
            flat[n:] = float("nan")
            kv[blocks, :, 0] = flat.view(len(blocks), bs, d)
        q = torch.randn(b, s_q, h_q, d, device=dev, dtype=dtype)
        out, lse = mla_decode_triton(q, kv, table, seqlens, dv, causal=causal)
        ref, ref_lse = mla_decode_reference(q, kv, table, seqlens, dv, causal=causal)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        lse_err = (lse - ref_lse).abs().max().item()
        bound = 1e-2 if dtype == torch.bfloat16 else 1e-3
        ok = bool(torch.isfinite(out).all()) and err < bound and lse_err < 1e-2
        check(f"mla_decode b={b} s_q={s_q} h_q={h_q} d={d} dv={dv} block={bs} max_len={max_len} causal={causal} "
              f"{str(dtype).removeprefix('torch.')}", ok, f"rel err {err:.2e} (< {bound:g}), lse max err "
              f"{lse_err:.2e} (< 1e-2)")


@guarded
def fp8_training(dev, steps):
    """A micro model trained in bf16 autocast and in FP8 (the compiled kernels): loss curves."""
    from leanmoe import ModelConfig, Transformer
    from leanmoe.train.fp8 import fp8_loss_curves

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=256, moe_intermediate_size=128,
                      n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                      first_k_dense_replace=1, num_nextn_predict_layers=1)
    base = Transformer(cfg).to(dev)
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(steps):
        start = torch.randint(0, cfg.vocab_size, (16, 1), generator=g)
        stride = torch.randint(1, 4, (16, 1), generator=g)
        seq = ((start + stride * torch.arange(129)) % cfg.vocab_size).to(dev)
        data.append((seq[:, :-1], seq[:, 1:]))
    bf, f8 = fp8_loss_curves(base, data, autocast_dtype=torch.bfloat16)
    rel = ((f8 - bf).abs() / bf)
    ok = bool(torch.isfinite(f8).all()) and rel.mean() < 0.03 and f8[-5:].mean() < 0.8 * f8[:5].mean()
    check(f"fp8 training vs bf16, {steps} steps", ok, f"mean |rel| {rel.mean():.2%} (< 3%), max {rel.max():.2%}; "
          f"loss {bf[0]:.3f} -> bf16 {bf[-5:].mean():.3f} / fp8 {f8[-5:].mean():.3f}")


@guarded
def engine(dev):
    """The inference engine on this device: greedy output equals a plain full-sequence forward
    (the decode steps read the paged cache through mla_decode)."""
    from leanmoe import ModelConfig, Transformer
    from leanmoe.infer import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = Transformer(cfg).to(dev).eval()
    llm = LLM(model, max_num_seqs=8)
    prompts = [torch.randint(10, cfg.vocab_size, (n,)).tolist() for n in (5, 17, 40, 70)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    same = 0
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p], device=dev)
        with torch.no_grad():
            for _ in range(24):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        same += ids[0, len(p):].tolist() == o.token_ids
    check(f"engine greedy == full forward on {dev} (fp32)", same == len(prompts), f"{same}/{len(prompts)} identical")


GROUPS = ["casts", "dense", "grouped", "unaligned", "masked", "faces", "cublas", "bf16", "mla", "training", "engine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", nargs="+", metavar="GROUP", choices=GROUPS, help=f"check only these groups: {GROUPS}")
    args = ap.parse_args()

    def want(group: str) -> bool:
        return args.only is None or group in args.only

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --device cpu for the interpreter")
    big = dev == "cuda"
    if big:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    if want("casts"):
        casts(dev, [(7, 300), (128, 7168), (4096, 2048)] if big else [(7, 300), (130, 256)])
    if want("dense"):
        dense_fp8(dev, [(m, n, k) for m in (1, 64, 4096) for n, k in ((2112, 7168), (24576, 1536), (7168, 2048))]
                  + [(129, 130, 257)] if big else [(3, 130, 257), (64, 256, 384)])
    if want("grouped"):
        grouped_fp8(dev, [[0, 5, 300, 128, 77], [1000, 3000, 0, 4096]] if big else [[0, 5, 130]],
                    *((4096, 7168) if big else (256, 256)))
    if want("unaligned"):
        unaligned_grouped(dev, [0, 5, 300, 128, 77] if big else [5, 0, 140, 7], *((4096, 7168) if big else (96, 256)))
    if want("masked"):
        masked_fp8(dev, *((8, 256, 4096, 7168) if big else (3, 32, 256, 256)))
    if want("faces"):
        faces(dev, *((4096, 7168, 2048) if big else (40, 96, 256)))
    if big and want("cublas"):
        cublas_fp8(dev, big)
    if want("bf16"):
        grouped_bf16(dev, [0, 5, 300, 128, 77] if big else [0, 5, 40], *((1024, 2048) if big else (64, 96)))
    bf = torch.bfloat16 if big else torch.float32
    if want("mla"):
        mla(dev, [(b, s_q, h_q, 576, 512, bs, n, causal, bf) for b, h_q, bs, n in
                  ((4, 128, 64, 1000), (33, 16, 64, 4096), (3, 16, 16, 300)) for s_q in (1, 2)
                  for causal in (False, True)]
            + [(2, 2, 8, 96, 64, 32, 200, True, torch.float32)] if big
            else [(2, s_q, 4, 48, 32, 16, 50, causal, bf) for s_q in (1, 2) for causal in (False, True)])
    if not big:  # the model-level checks under the interpreter would take many minutes: torch references
        os.environ.pop("LEANMOE_TRITON_INTERPRET")
    if want("training"):
        fp8_training(dev, 40 if big else 16)
    if want("engine"):
        engine(dev)
    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed on {dev}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
