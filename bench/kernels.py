"""Kernel throughput: leanmoe's FP8 GEMMs and MLA decode vs what a user would otherwise run.

On a CUDA GPU (Triton kernels):
  * FP8 GEMMs (normal, m-grouped contiguous, m-grouped masked) in TFLOPS, both backends (the Triton
    kernel, cuBLAS's blockwise GEMM where it runs: sm_90), against torch.matmul in bf16 (cuBLAS) and
    torch._scaled_mm (cuBLAS FP8, per-tensor scales); target on H100/H200 (issue #12): >= 1.3x bf16
    at M = 4096, >= 1.0x at M = 64 / 128 (2x is the hardware limit).
  * mla_decode in GB/s (latent cache + q + out bytes over time), against gathering the paged
    cache and calling torch's scaled_dot_product_attention; target: >= 60% of peak HBM bandwidth at
    128 heads, >= 75% at 16 (FlashMLA reports ~3000 GB/s on H800).
Shapes are DeepSeek-V3's (DeepGEMM's and FlashMLA's own benchmark lists).

Without a GPU it times the torch references on reduced shapes and says so: those numbers
describe the CPU reference path, not the kernels.

    python bench/kernels.py            # everything
    python bench/kernels.py --only mla --quick
    python bench/kernels.py --sweep    # GPU: time alternative tile configurations first
    python bench/kernels.py --only mla-cpu   # the CPU decode attention: C kernel vs torch path vs SDPA
    python bench/kernels.py --only experts-cpu   # the CPU experts' MLP: C kernel vs grouped GEMMs
    python bench/kernels.py --only rows-cpu      # the MoE's bf16 gather + combine in training: C kernels vs torch
    python bench/kernels.py --only experts-bf16  # the experts' MLP in bf16 training: C kernel vs grouped GEMMs
    python bench/kernels.py --only crossover     # GPU: FP8 GEMM backends from 16 to 2048 rows, `small`'s experts

Every timed kernel output is first compared with the same call's reference (FP8 GEMMs: DeepGEMM's
calc_diff against the unquantised product < 1e-3; MLA: relative error against the gather + SDPA
baseline < 1e-2), so a fast wrong kernel cannot enter the table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from leanmoe.kernels.fp8 import per_block_cast_to_fp8, per_token_cast_to_fp8
from leanmoe.kernels.fp8_gemm import (contiguous_layout, fp8_gemm_nt, m_grouped_fp8_gemm_nt_contiguous,
                                      m_grouped_fp8_gemm_nt_masked)
from leanmoe.kernels.fp8_gemm import calc_diff
from leanmoe.kernels.mla_decode import mla_decode

# DeepGEMM's benchmark shapes: (M, N, K) of V3's dense projections at decode and prefill sizes
DENSE = [(m, n, k) for m in (64, 128, 4096) for n, k in
         ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))]
GROUPED = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048)]  # G, M/G, N, K
MASKED = [(1, 1024, 4096, 7168), (2, 512, 7168, 2048), (4, 256, 4096, 7168), (16, 64, 7168, 2048)]  # G, M, N, K
# FlashMLA's: batch, s_q, h_q (128 = V3 on one GPU), cache length, block 64, d = 576, dv = 512
MLA = [(b, s_q, 128, 4096) for b in (64, 128) for s_q in (1, 2)] + [(128, 1, 16, 8192)]

CPU_DENSE = [(16, 2112, 7168), (16, 7168, 2048), (128, 4096, 1024)]
CPU_GROUPED = [(4, 128, 2048, 1024)]
CPU_MASKED = [(4, 64, 2048, 1024)]
CPU_MLA = [(4, 1, 16, 1024), (4, 2, 16, 1024)]
# the C kernel's shapes: b, s_q, h_q, cache length, block size. The first four are bench/serve_vs_vllm.py's
# model (4 heads, block 16) at batch 1 and 16; then more heads (mla_decode uses the kernel up to
# CPU_KERNEL_MAX_ROWS = 32 rows per sequence: these show why) and longer caches
CPU_KERNEL_MLA = [(1, 1, 4, 128, 16), (16, 1, 4, 128, 16), (16, 2, 4, 128, 16), (16, 1, 4, 1024, 16),
                  (1, 1, 16, 1024, 64), (8, 1, 16, 1024, 64), (4, 1, 32, 2048, 64), (4, 1, 64, 2048, 64),
                  (4, 1, 128, 2048, 64)]
# (experts, hidden, expert width, token copies): bench/serve_vs_vllm.py's model at batch 1, 16 and 64
# (top-2), the `tiny` preset (32 experts, top-4) at batch 16 and 64, and past the threshold
CPU_KERNEL_EXPERTS = [(8, 256, 128, 2), (8, 256, 128, 32), (8, 256, 128, 128), (8, 256, 128, 256),
                      (32, 256, 64, 64), (32, 256, 64, 256), (32, 256, 64, 512), (32, 256, 64, 1024)]
# (N tokens, K copies, D hidden, E experts): `tiny`'s training batch (16 x 256 tokens), half and twice it
CPU_KERNEL_ROWS = [(4096, 4, 256, 32), (2048, 4, 256, 32), (8192, 4, 256, 32)]
# E, D, F, M token copies: tiny's batch (4096 tokens x top-4), half of it, and wider experts
CPU_KERNEL_EXPERTS_BF16 = [(32, 256, 64, 16384), (32, 256, 64, 8192), (16, 512, 128, 8192)]


def timer(fn, cuda: bool) -> float:
    """Median seconds per call."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    if not rows:
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def verify(name: str, err: float, bound: float) -> None:
    """A timed kernel must first be right on the very inputs it is timed on."""
    if not err < bound:
        raise SystemExit(f"WRONG RESULT: {name}: error {err:.3g} >= {bound:g}; not timing a wrong kernel")


def _scaled_mm(a8: torch.Tensor, b8: torch.Tensor):
    """torch._scaled_mm with per-tensor scales (cuBLAS FP8), or None where it does not run."""
    one = torch.ones((), device=a8.device)
    try:
        torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, AttributeError):
        return None
    return lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def cublas_time(name: str, fn, ref, cuda: bool) -> float | str:
    """Seconds per call of leanmoe's cuBLAS backend, checked against `ref` first; or why it has no
    time: "n/a" off a GPU, "WRONG" for a wrong result, the error where it raised (each printed)."""
    if not cuda:
        return "n/a"
    try:
        verify(f"{name} (cuBLAS)", calc_diff(fn(), ref), 1e-3)
    except SystemExit as e:
        print(e)
        return "WRONG"
    except (ValueError, RuntimeError, NotImplementedError) as e:
        print(f"{name} (cuBLAS): {type(e).__name__}: {e}")
        return f"error: {type(e).__name__}"
    return timer(fn, cuda)


def _tf(flops: float, t) -> str:
    return f"{flops / t / 1e12:.3g}" if isinstance(t, float) else t


def _ratio(t_base, t) -> str:
    return f"{t_base / t:.2f}x" if isinstance(t, float) and isinstance(t_base, float) else "n/a"


def bench_dense(shapes, dev: str, cuda: bool) -> None:
    rows = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        qa, qb = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)
        flops = 2 * m * n * k
        ref = a.float() @ b.float().T
        verify(f"fp8_gemm_nt {m}x{n}x{k}", calc_diff(fp8_gemm_nt(qa, qb, backend="triton"), ref), 1e-3)
        t_fp8 = timer(lambda: fp8_gemm_nt(qa, qb, backend="triton"), cuda)
        t_cb = cublas_time(f"fp8_gemm_nt {m}x{n}x{k}", lambda: fp8_gemm_nt(qa, qb, backend="cublas"), ref, cuda)
        t_bf16 = timer(lambda: a @ b.T, cuda)
        sm = _scaled_mm(qa[0], qb[0]) if cuda else None
        t_sm = timer(sm, cuda) if sm else None
        rows.append([f"{m}x{n}x{k}", _tf(flops, t_fp8), _tf(flops, t_cb), f"{flops / t_bf16 / 1e12:.3g}",
                     f"{flops / t_sm / 1e12:.3g}" if t_sm else "n/a", _ratio(t_bf16, t_fp8), _ratio(t_bf16, t_cb)])
    table("fp8_gemm_nt (1x128 x 128x128 scales; Triton and cuBLAS backends) vs bf16 matmul and per-tensor "
          "_scaled_mm (TFLOPS)", ["MxNxK", "Triton", "cuBLAS", "bf16", "_scaled_mm", "Triton/bf16", "cuBLAS/bf16"],
          rows)


def bench_grouped(shapes, masked_shapes, dev: str, cuda: bool) -> None:
    rows = []
    for g, m_per, n, k in shapes:
        m = g * m_per
        offs = torch.arange(1, g + 1, device=dev, dtype=torch.int32) * m_per
        pos, m_indices, _ = contiguous_layout(offs, m)
        x = torch.randn(m_indices.shape[0], k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16)
        qx, qw = per_token_cast_to_fp8(x), per_block_cast_to_fp8(w)
        flops = 2 * m * n * k
        xb = x[: m].view(g, m_per, k)
        ref = torch.bmm(xb.float(), w.float().transpose(1, 2))
        verify(f"m_grouped_contiguous {g}x{m_per}x{n}x{k}", calc_diff(
            m_grouped_fp8_gemm_nt_contiguous(qx, qw, m_indices, backend="triton")[: m].view(g, m_per, n), ref), 1e-3)
        t_fp8 = timer(lambda: m_grouped_fp8_gemm_nt_contiguous(qx, qw, m_indices, backend="triton"), cuda)
        t_cb = cublas_time(f"m_grouped_contiguous {g}x{m_per}x{n}x{k}", lambda: m_grouped_fp8_gemm_nt_contiguous(
            qx, qw, m_indices, backend="cublas")[: m].view(g, m_per, n), ref, cuda)
        t_bf16 = timer(lambda: torch.bmm(xb, w.transpose(1, 2)), cuda)  # equal groups: a batched matmul
        rows.append([f"{g}x{m_per}x{n}x{k}", _tf(flops, t_fp8), _tf(flops, t_cb), f"{flops / t_bf16 / 1e12:.3g}",
                     _ratio(t_bf16, t_fp8), _ratio(t_bf16, t_cb)])
    table("m_grouped_fp8_gemm_nt_contiguous vs bf16 bmm (equal groups; TFLOPS)",
          ["GxM/GxNxK", "Triton", "cuBLAS", "bf16", "Triton/bf16", "cuBLAS/bf16"], rows)
    rows = []
    for g, m, n, k in masked_shapes:
        a = torch.randn(g, m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(g, n, k, device=dev, dtype=torch.bfloat16)
        qa = per_token_cast_to_fp8(a.view(g * m, k))
        qa = (qa[0].view(g, m, k), qa[1].view(g, m, -1))
        qw = per_block_cast_to_fp8(w)
        masked_m = torch.full((g,), m, device=dev, dtype=torch.int32)
        flops = 2 * g * m * n * k
        ref = torch.bmm(a.float(), w.float().transpose(1, 2))
        verify(f"m_grouped_masked {g}x{m}x{n}x{k}",
               calc_diff(m_grouped_fp8_gemm_nt_masked(qa, qw, masked_m, m, backend="triton"), ref), 1e-3)
        t_fp8 = timer(lambda: m_grouped_fp8_gemm_nt_masked(qa, qw, masked_m, m, backend="triton"), cuda)
        t_cb = cublas_time(f"m_grouped_masked {g}x{m}x{n}x{k}",
                           lambda: m_grouped_fp8_gemm_nt_masked(qa, qw, masked_m, m, backend="cublas"), ref, cuda)
        t_bf16 = timer(lambda: torch.bmm(a, w.transpose(1, 2)), cuda)
        rows.append([f"{g}x{m}x{n}x{k}", _tf(flops, t_fp8), _tf(flops, t_cb), f"{flops / t_bf16 / 1e12:.3g}",
                     _ratio(t_bf16, t_fp8), _ratio(t_bf16, t_cb)])
    table("m_grouped_fp8_gemm_nt_masked (all rows valid) vs bf16 bmm (TFLOPS)",
          ["GxMxNxK", "Triton", "cuBLAS", "bf16", "Triton/bf16", "cuBLAS/bf16"], rows)


def _sdpa_paged(q, kv_cache, block_table, seqlens, dv, scale):
    """The baseline: gather every sequence's cache into a padded tensor, then SDPA with the one
    latent head shared by all query rows (MQA: rows = s_q x h_q, no per-head copy of the cache),
    causal over the s_q new tokens as mla_decode(causal=True)."""
    b, s_q, h_q, d = q.shape
    k = kv_cache[block_table.long(), :, 0].reshape(b, 1, -1, d)  # [b, 1, max_len, d]
    # row r = i * h_q + h sees keys < seqlen - (s_q - 1 - i)
    limit = seqlens[:, None] - (s_q - 1 - torch.arange(s_q, device=q.device))[None]  # [b, s_q]
    mask = torch.arange(k.shape[2], device=q.device)[None, None, :] < limit[..., None]  # [b, s_q, S]
    mask = mask.repeat_interleave(h_q, dim=1)[:, None]  # [b, 1, s_q * h_q, S]
    o = F.scaled_dot_product_attention(q.reshape(b, 1, s_q * h_q, d), k, k[..., :dv], attn_mask=mask, scale=scale)
    return o.view(b, s_q, h_q, dv)


def _mla_case(dev, b, s_q, h_q, s_k, verify_name, d=576, dv=512, bs=64, tile_config=None):
    """Random q and a full paged cache (shuffled blocks) for one shape, with mla_decode (with
    `tile_config`) checked against the SDPA baseline on it. -> (q, kv_cache, block_table, seqlens,
    bytes moved)."""
    n_blocks = s_k // bs
    kv = torch.randn(b * n_blocks, bs, 1, d, device=dev, dtype=torch.bfloat16)
    block_table = torch.randperm(b * n_blocks, device=dev).view(b, n_blocks).to(torch.int32)
    seqlens = torch.full((b,), s_k, device=dev, dtype=torch.int32)
    q = torch.randn(b, s_q, h_q, d, device=dev, dtype=torch.bfloat16)
    out = mla_decode(q, kv, block_table, seqlens, dv, d ** -0.5, causal=True, tile_config=tile_config)[0]
    ref = _sdpa_paged(q, kv, block_table, seqlens, dv, d ** -0.5)
    verify(f"{verify_name} b={b} s_q={s_q} h_q={h_q}",
           ((out.float() - ref.float()).norm() / ref.float().norm()).item(), 1e-2)
    return q, kv, block_table, seqlens, (b * s_k * d + q.numel() + b * s_q * h_q * dv) * 2


def bench_mla(shapes, dev: str, cuda: bool) -> None:
    d, dv = 576, 512
    peak = None
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        if hasattr(props, "memory_clock_rate") and hasattr(props, "memory_bus_width"):
            peak = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 / 1e9  # GB/s, DDR
    rows = []
    for b, s_q, h_q, s_k in shapes:
        q, kv, block_table, seqlens, nbytes = _mla_case(dev, b, s_q, h_q, s_k, verify_name="mla_decode")
        scale = d ** -0.5
        t = timer(lambda: mla_decode(q, kv, block_table, seqlens, dv, scale, causal=True), cuda)
        t_ref = timer(lambda: _sdpa_paged(q, kv, block_table, seqlens, dv, scale), cuda)
        gbs = nbytes / t / 1e9
        rows.append([f"b={b} s_q={s_q} h_q={h_q} s_k={s_k}", f"{gbs:.3g}", f"{nbytes / t_ref / 1e9:.3g}",
                     f"{t_ref / t:.2f}x", f"{100 * gbs / peak:.0f}%" if peak else "n/a"])
    table("mla_decode (paged, bf16, d=576, dv=512, block 64) vs gather + SDPA",
          ["shape", "GB/s", "SDPA GB/s", "vs SDPA", "of peak"], rows)


def alternate(fns: dict, rounds: int) -> dict[str, float]:
    """CPU seconds per call of each function, timed in turn for `rounds` rounds: the median of the
    rounds' medians (alternating, so a slow spell of the machine hits every function alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn, False))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_mla_cpu(shapes, rounds: int = 3) -> None:
    """The CPU decode attention: leanmoe's C kernel (the CPU default for fp32) against the batched
    torch path it replaced (its per-step plan made beforehand, as the engine's first layer does)
    and against gather + SDPA, fp32, alternating in rounds; the median of the rounds' medians."""
    from leanmoe.kernels.cpu_kernels import status
    from leanmoe.kernels.mla_decode import mla_decode_cpu, mla_decode_torch

    print(f"\nC kernel: {status()}; {torch.get_num_threads()} threads")
    rows = []
    for b, s_q, h_q, s_k, bs in shapes:
        d, dv, scale = 576, 512, 576 ** -0.5
        n_blocks = -(-s_k // bs)
        kv = torch.randn(b * n_blocks + 1, bs, 1, d)
        block_table = torch.randperm(b * n_blocks + 1)[: b * n_blocks].view(b, n_blocks).to(torch.int32)
        seqlens = torch.full((b,), s_k, dtype=torch.int32)
        q = torch.randn(b, s_q, h_q, d)
        plans: dict = {}
        fns = {"C kernel": lambda: mla_decode_cpu(q, kv, block_table, seqlens, dv, scale, True),
               "torch": lambda: mla_decode_torch(q, kv, block_table, seqlens, dv, scale, True, plans),
               "SDPA": lambda: _sdpa_paged(q, kv, block_table, seqlens, dv, scale)}
        ref = _sdpa_paged(q, kv, block_table, seqlens, dv, scale)
        for name in ("C kernel", "torch"):
            out = fns[name]()[0]
            verify(f"{name} b={b} s_q={s_q} h_q={h_q}", ((out - ref).norm() / ref.norm()).item(), 1e-5)
        t = alternate(fns, rounds)
        rows.append([f"b={b} s_q={s_q} h_q={h_q} s_k={s_k} bs={bs}", f"{t['C kernel'] * 1e6:.0f}",
                     f"{t['torch'] * 1e6:.0f}", f"{t['SDPA'] * 1e6:.0f}", f"{t['torch'] / t['C kernel']:.2f}x",
                     f"{t['SDPA'] / t['C kernel']:.2f}x"])
    table("mla_decode on the CPU (paged, fp32, d=576, dv=512), microseconds per call",
          ["shape", "C kernel", "torch path", "gather + SDPA", "vs torch", "vs SDPA"], rows)


def bench_experts_cpu(shapes, rounds: int = 3) -> None:
    """The routed experts' SwiGLU MLP at decode sizes on the CPU: leanmoe's C kernel (the inference
    default for fp32 at <= CPU_EXPERTS_MAX_ROWS rows per expert) against the grouped GEMMs + silu it
    replaced (torch._grouped_mm), fp32, token copies spread evenly over the experts, alternating in
    rounds; the median of the rounds' medians."""
    from leanmoe.kernels.cpu_kernels import status
    from leanmoe.kernels.grouped_gemm import expert_mlp_cpu, expert_mlp_reference

    print(f"\nC kernel: {status()}; {torch.get_num_threads()} threads")
    rows = []
    for e, d, f, m in shapes:
        w1, w2 = torch.randn(e, 2 * f, d) / d**0.5, torch.randn(e, d, f) / f**0.5
        x = torch.randn(m, d)
        offs = torch.bincount(torch.arange(m) % e, minlength=e).cumsum(0).to(torch.int32)
        fns = {"C kernel": lambda: expert_mlp_cpu(x, w1, w2, offs),
               "grouped": lambda: expert_mlp_reference(x, w1, w2, offs)}
        with torch.no_grad():
            ref = fns["grouped"]()
            verify(f"experts E={e} M={m}", ((fns["C kernel"]() - ref).norm() / ref.norm()).item(), 1e-5)
            t = alternate(fns, rounds)
        rows.append([f"E={e} D={d} F={f} M={m} ({m / e:g} rows/expert)", f"{t['C kernel'] * 1e6:.0f}",
                     f"{t['grouped'] * 1e6:.0f}", f"{t['grouped'] / t['C kernel']:.2f}x"])
    table("routed experts' SwiGLU MLP on the CPU (fp32), microseconds per call",
          ["shape", "C kernel", "grouped GEMMs", "vs grouped"], rows)


def bench_rows_cpu(shapes, rounds: int = 3) -> None:
    """The MoE's padded token-copy rows in bf16 training on the CPU: the gather into expert order and
    the weighted combine back, forward and backward, by leanmoe's C kernels (leanmoe.kernels.moe_rows,
    the default) against the torch ops they replaced (cast, index_select, product and sum; index_add
    in the backward). Tokens routed at random, each expert's rows padded to CPU_ONEDNN_ROW_ALIGN."""
    from leanmoe.kernels import moe_rows
    from leanmoe.kernels.cpu_kernels import status
    from leanmoe.kernels.grouped_gemm import CPU_ONEDNN_ROW_ALIGN as align
    from leanmoe.model.moe import expert_counts, padded_layout

    print(f"\nC kernel: {status()}; {torch.get_num_threads()} threads")
    rows = []
    for n, k, d, e in shapes:
        flat = torch.randint(0, e, (n * k,))  # copy t * k + j goes to expert flat[t * k + j]
        src, _, row = padded_layout(flat, flat.argsort(stable=True), expert_counts(flat, e), k, align)
        x, w = torch.randn(n, d, requires_grad=True), torch.rand(n, k, requires_grad=True)
        g = torch.randn(n, d).bfloat16()

        def kernel():
            moe_rows.combine_rows(moe_rows.gather_rows(x, src, row, k), row, w).backward(g)

        def reference():
            moe_rows.combine_rows_reference(moe_rows.gather_rows_reference(x, src), row, w).backward(g)

        out = moe_rows.combine_rows(moe_rows.gather_rows(x, src, row, k), row, w).float()
        ref = moe_rows.combine_rows_reference(moe_rows.gather_rows_reference(x, src), row, w).float()
        verify(f"rows N={n} K={k} D={d}", ((out - ref).norm() / ref.norm()).item(), 1e-2)
        t = alternate({"C kernels": kernel, "torch": reference}, rounds)
        rows.append([f"N={n} K={k} D={d} E={e} (P={len(src)})", f"{t['C kernels'] * 1e3:.2f}",
                     f"{t['torch'] * 1e3:.2f}", f"{t['torch'] / t['C kernels']:.2f}x"])
    table("MoE gather + combine, forward and backward, bf16 on the CPU, ms per call",
          ["shape", "C kernels", "torch ops", "vs torch"], rows)
    step_rows_cpu(rounds=8)


def step_ab(module, attr: str, off, rounds: int) -> None:
    """Whole bf16 training steps of `tiny` (16 x 256 random tokens, bench/cpu_heap.py's step; the
    trainer's retained CPU heap), alternating step by step between the C kernel(s) (module.attr as it
    is) and the torch path (module.attr replaced by `off`)."""
    from cpu_heap import training_step

    from leanmoe.train.memory import retain_cpu_heap

    heap = retain_cpu_heap()
    step = training_step("MoE", "bf16")
    on = getattr(module, attr)
    variants = {"C kernel": on, "torch": off}
    times: dict[str, list[float]] = {k: [] for k in variants}
    try:
        for r in range(rounds + 2):  # two warm-up rounds
            for name, fn in variants.items():
                setattr(module, attr, fn)
                t = time.perf_counter()
                step()
                if r >= 2:
                    times[name].append(time.perf_counter() - t)
    finally:
        setattr(module, attr, on)
    ratio = [b / a for a, b in zip(times["C kernel"], times["torch"])]
    print(f"tiny bf16 training step ({heap}), {module.__name__}.{attr} on and off, ms, {rounds} alternating rounds:")
    for name, ts in times.items():
        print(f"  {name:10s} median {statistics.median(ts) * 1e3:6.0f}  ({' '.join(f'{t * 1e3:.0f}' for t in ts)})")
    print(f"  speed-up of the C kernel: {statistics.median(ratio):.3f}x (per round {min(ratio):.3f}-{max(ratio):.3f})")


def step_rows_cpu(rounds: int) -> None:
    """step_ab for the gather and combine kernels (leanmoe.kernels.moe_rows)."""
    from leanmoe.kernels import moe_rows

    step_ab(moe_rows, "rows_kernels_apply", lambda t: False, rounds)


def bench_experts_bf16(shapes, rounds: int = 5) -> None:
    """The routed experts' SwiGLU MLP in bf16 training on the CPU, forward and backward: leanmoe's C
    kernel (leanmoe.kernels.experts_bf16, the default where the CPU has AVX512-BF16) against the
    grouped GEMMs + silu it replaced (torch._grouped_mm under bf16 autocast, the weights cast from
    fp32). Rows per expert drawn unevenly (Dirichlet(3), as a router balancing mid-run gives), padded
    to CPU_ONEDNN_ROW_ALIGN; then whole training steps of `tiny` alternating the two. The trainer's
    retained CPU heap is on for both (leanmoe.train.memory)."""
    from leanmoe.kernels import experts_bf16
    from leanmoe.kernels.cpu_kernels import status
    from leanmoe.kernels.grouped_gemm import CPU_ONEDNN_ROW_ALIGN as align
    from leanmoe.kernels.grouped_gemm import expert_mlp_reference

    from leanmoe.train.memory import retain_cpu_heap

    heap = retain_cpu_heap()  # as the trainer runs: the kernel's scratch and torch's buffers reuse memory
    print(f"\nC kernel: {status()}; AVX512-BF16 kernel built: {experts_bf16._lib() is not None}; "
          f"{torch.get_num_threads()} threads; CPU heap: {heap}")
    if experts_bf16._lib() is None:
        print("the bf16 experts kernel needs a CPU (and compiler) with AVX512-BF16: nothing to time")
        return
    rows = []
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for e, d, f, m in shapes:
        share = torch.distributions.Dirichlet(torch.full((e,), 3.0)).sample()
        counts = ((share * m).long() + align - 1) // align * align
        offs = counts.cumsum(0).to(torch.int32)
        p = int(offs[-1])
        x = torch.randn(p, d, generator=gen).bfloat16().requires_grad_()
        w1 = (torch.randn(e, 2 * f, d, generator=gen) / d**0.5).requires_grad_()
        w2 = (torch.randn(e, d, f, generator=gen) / f**0.5).requires_grad_()
        g = torch.randn(p, d, generator=gen).bfloat16()

        def kernel():
            experts_bf16.expert_mlp_bf16(x, w1, w2, offs).backward(g)

        def reference():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = expert_mlp_reference(x, w1.to(torch.bfloat16), w2.to(torch.bfloat16), offs)
            y.backward(g)

        with torch.no_grad():
            out = experts_bf16.expert_mlp_bf16(x, w1, w2, offs).float()
            ref = expert_mlp_reference(x.float(), w1.bfloat16().float(), w2.bfloat16().float(), offs)
        verify(f"experts bf16 E={e} M={m}", ((out - ref).norm() / ref.norm()).item(), 1e-2)
        t = alternate({"C kernel": kernel, "grouped": reference}, rounds)
        flops = 3 * 2 * p * d * 3 * f  # forward + backward (two GEMMs each for the input and weight gradients)
        rows.append([f"E={e} D={d} F={f} M={m} (P={p}, max/mean {counts.max().item() * e / p:.2f})",
                     f"{t['C kernel'] * 1e3:.2f} ({flops / t['C kernel'] / 1e9:.0f})",
                     f"{t['grouped'] * 1e3:.2f} ({flops / t['grouped'] / 1e9:.0f})", f"{t['grouped'] / t['C kernel']:.2f}x"])
    table("routed experts' SwiGLU MLP, forward and backward, bf16 training on the CPU, ms per call (GFLOP/s)",
          ["shape", "C kernel", "grouped GEMMs", "vs grouped"], rows)
    step_ab(experts_bf16, "experts_kernel_applies", lambda *a: False, rounds=8)


# --sweep: tile configurations tried on a GPU (block_m, block_n, num_warps, num_stages) for the FP8
# GEMM and (rows per program, keys per step, num_warps, num_stages) for MLA decode; the first is
# the library default.
GEMM_CONFIGS = [(128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3), (32, 64, 4, 4), (64, 64, 4, 6),
                (128, 128, 8, 4)]
GEMM_SWEEP = [(64, 2112, 7168), (128, 7168, 2048), (128, 24576, 1536), (4096, 7168, 16384)]
# split-K of the Triton kernel at decode-sized M (default tiles), against bf16 cuBLAS
GEMM_SPLITS = [1, 2, 4, 8, 16]
GEMM_SPLIT_SWEEP = [(64, 2112, 7168), (64, 7168, 2048), (64, 4096, 7168), (128, 7168, 2048), (128, 2112, 7168),
                    (128, 7168, 16384)]
MLA_CONFIGS = [(64, 64, 8, 2), (32, 128, 8, 2), (64, 32, 8, 2), (64, 128, 8, 2), (64, 64, 16, 2), (64, 32, 16, 2),
               (64, 64, 8, 3), (32, 128, 8, 3), (32, 256, 8, 2), (32, 128, 4, 2), (32, 64, 8, 2)]
MLA_SWEEP = [(128, 1, 128, 4096), (64, 2, 128, 4096), (128, 1, 16, 8192), (64, 2, 16, 8192)]
# split-KV: programs per sequence (None: the heuristic), per (shape, tile config)
MLA_SPLITS = [None, 1, 2, 4, 8]
MLA_SPLIT_CASES = [((128, 1, 16, 8192), (32, 128, 8, 2)), ((64, 2, 16, 8192), (32, 128, 8, 2)),
                   ((128, 1, 128, 4096), (64, 64, 8, 2))]
# --only crossover: where cuBLAS overtakes the Triton FP8 GEMM (rows), and `small`'s expert GEMMs
CROSSOVER = [(m, n, k) for m in (16, 129, 256, 512, 1024, 2048) for n, k in ((7168, 2048), (4096, 7168))]
GROUPED_SMALL = [(64, 3072, 768, 768), (64, 3072, 768, 384), (64, 512, 768, 768)]  # G, M/G, N, K


def sweep(dev: str, what: str = "all") -> None:
    """Time each tile configuration on a few shapes (GPU only); prints TFLOPS / GB/s per config.
    what: "all", "gemm" or "mla"."""
    if what in ("all", "gemm"):
        sweep_gemm(dev)
    if what in ("all", "mla"):
        sweep_mla(dev)


def sweep_cell(measure) -> str:
    """One cell of a --sweep table: measure() checks the kernel's output on its inputs (verify exits
    on a wrong one), times it and returns the cell's text; "WRONG" or the error's type where it fails
    (a config that fails or is wrong is reported, not fatal)."""
    try:
        return measure()
    except (Exception, SystemExit) as e:  # noqa: BLE001
        return "WRONG" if isinstance(e, SystemExit) else f"error: {type(e).__name__}"


def sweep_gemm(dev: str) -> None:
    def gemm_cell(m, n, k, t_bf16=None, **kw):
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        qa, qb = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)

        def measure():
            verify("sweep", calc_diff(fp8_gemm_nt(qa, qb, **kw), a.float() @ b.float().T), 1e-3)
            t = timer(lambda: fp8_gemm_nt(qa, qb, **kw), True)
            return f"{2 * m * n * k / t / 1e12:.0f}" + (f" ({t_bf16 / t:.2f}x)" if t_bf16 else "")
        return sweep_cell(measure)

    rows = [[str(cfg)] + [gemm_cell(*shape, tile_config=cfg, backend="triton") for shape in GEMM_SWEEP]
            for cfg in GEMM_CONFIGS]
    table("sweep: fp8_gemm_nt TFLOPS per (block_m, block_n, warps, stages)",
          ["config"] + [f"{m}x{n}x{k}" for m, n, k in GEMM_SWEEP], rows)
    rows = []
    for m, n, k in GEMM_SPLIT_SWEEP:
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        t_bf16 = timer(lambda: a @ b.T, True)
        rows.append([f"{m}x{n}x{k}", f"{2 * m * n * k / t_bf16 / 1e12:.0f}"]
                    + [gemm_cell(m, n, k, t_bf16, split_k=split) for split in GEMM_SPLITS])
    table("sweep: Triton fp8_gemm_nt TFLOPS (vs bf16) per split_k", ["MxNxK", "bf16"] + [str(s) for s in GEMM_SPLITS],
          rows)


def sweep_mla(dev: str) -> None:
    from leanmoe.kernels.mla_decode import mla_decode_triton

    d, dv = 576, 512

    def tiles_cell(shape, cfg):
        def measure():
            q, kv, table_, seqlens, nbytes = _mla_case(dev, *shape, verify_name="sweep", tile_config=cfg)
            t = timer(lambda: mla_decode(q, kv, table_, seqlens, dv, d ** -0.5, causal=True, tile_config=cfg), True)
            return f"{nbytes / t / 1e9:.0f}"
        return sweep_cell(measure)

    rows = [[str(cfg)] + [tiles_cell(shape, cfg) for shape in MLA_SWEEP] for cfg in MLA_CONFIGS]
    table("sweep: mla_decode GB/s per (rows, keys per step, warps, stages)",
          ["config"] + [f"b={b} s_q={s} h={h} s_k={n}" for b, s, h, n in MLA_SWEEP], rows)
    rows = []
    for (b, s_q, h_q, s_k), cfg in MLA_SPLIT_CASES:
        row = [f"b={b} h={h_q} s_k={s_k} {cfg}"]
        q, kv, table_, seqlens, nbytes = _mla_case(dev, b, s_q, h_q, s_k, verify_name="splits", tile_config=cfg)
        ref = _sdpa_paged(q, kv, table_, seqlens, dv, d ** -0.5).float()
        for n_splits in MLA_SPLITS:
            def run():
                return mla_decode_triton(q, kv, table_, seqlens, dv, d ** -0.5, True, n_splits, tile_config=cfg)

            def measure():
                verify("splits", ((run()[0].float() - ref).norm() / ref.norm()).item(), 1e-2)
                return f"{nbytes / timer(run, True) / 1e9:.0f}"
            row.append(sweep_cell(measure))
        rows.append(row)
    table("sweep: mla_decode GB/s per number of KV splits (None: the heuristic)",
          ["shape, config"] + [str(n) for n in MLA_SPLITS], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["dense", "grouped", "mla", "mla-cpu", "experts-cpu", "rows-cpu", "experts-bf16",
                                        "crossover"],
                   help="run one group")
    p.add_argument("--quick", action="store_true", help="first few shapes only")
    p.add_argument("--sweep", nargs="?", const="all", choices=["all", "gemm", "mla"],
                   help="GPU: first time alternative tile configurations (all, or only gemm / mla)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  (Triton kernels)")
    elif args.only in (None, "dense", "grouped", "mla", "crossover"):  # the GPU kernels' groups
        print("NO GPU: timing the torch CPU REFERENCES on reduced shapes. These numbers describe the\n"
              "CPU reference path (dequantise + fp32 matmul, gather + softmax), not the Triton kernels.")
    if args.sweep and cuda:
        sweep(dev, args.sweep)
    cut = (lambda s: s[:2]) if args.quick else (lambda s: s)
    if args.only in (None, "dense"):
        bench_dense(cut(DENSE if cuda else CPU_DENSE), dev, cuda)
    if args.only in (None, "grouped"):
        bench_grouped(cut(GROUPED if cuda else CPU_GROUPED), cut(MASKED if cuda else CPU_MASKED), dev, cuda)
    if args.only in (None, "mla"):
        bench_mla(cut(MLA if cuda else CPU_MLA), dev, cuda)
    if args.only == "crossover":
        bench_dense(cut(CROSSOVER if cuda else CPU_DENSE), dev, cuda)
        bench_grouped(cut(GROUPED_SMALL if cuda else CPU_GROUPED), [], dev, cuda)
    if args.only == "mla-cpu" or (args.only is None and not cuda):
        bench_mla_cpu(cut(CPU_KERNEL_MLA))
    if args.only == "experts-cpu" or (args.only is None and not cuda):
        bench_experts_cpu(cut(CPU_KERNEL_EXPERTS))
    if args.only == "rows-cpu" or (args.only is None and not cuda):
        bench_rows_cpu(cut(CPU_KERNEL_ROWS))
    if args.only == "experts-bf16" or (args.only is None and not cuda):
        bench_experts_bf16(cut(CPU_KERNEL_EXPERTS_BF16))


if __name__ == "__main__":
    main()
