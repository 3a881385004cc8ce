"""MLA decode over a paged latent KV cache, with FlashMLA's calling convention.

Shape legend: b batch, s_q query tokens per sequence (1 for decode, 2+ for speculative verify),
h_q query heads, d = C + R head size of q and of the cache (576 for V3), dv = C value size (512),
n_blocks cache blocks, bs tokens per block.

    q            [b, s_q, h_q, d]     query already absorbed: [W_UK^T q_nope ; rotated q_pe]
    kv_cache     [n_blocks, bs, 1, d] per token: [normalised c_kv ; rotated k_pe]
    block_table  [b, max_blocks] int32  block ids of each sequence, in order
    cache_seqlens [b] int32            valid tokens per sequence (the s_q new ones included)

    out[b, i, h] = softmax_j(scale * q[b, i, h] . K[b, j]) @ K[b, j, :dv]      -> [b, s_q, h_q, dv]
    lse[b, h, i] = log sum_j exp(scale * q . K)   (natural log; -inf for an empty row)

With causal=True, query i of s_q sits at position seqlen - s_q + i and sees keys up to it;
otherwise every query sees all seqlen keys. Slots past a sequence's length are never read, so
padding may hold anything (tests fill it with NaN).

`mla_decode_reference` is the obvious per-sequence gather-and-softmax in fp32;
`mla_decode_torch` is the same math for the whole batch at once in torch ops;
`mla_decode_cpu` is a C kernel (leanmoe/kernels/cpu_mla.c) that reads the keys in place;
`mla_decode` is the dispatch point every caller uses (Triton on CUDA/ROCm tensors, the C kernel for
fp32 CPU tensors with at most CPU_KERNEL_MAX_ROWS query rows per sequence, the batched torch path
elsewhere; see leanmoe.kernels.dispatch for the rule, LEANMOE_TRITON_INTERPRET and LEANMOE_CPU_KERNELS).
The inference call site, one MLA layer's absorbed attention over a paged cache, is
leanmoe.infer.paged_cache.paged_mla_attend.

The Triton kernel is flash-decoding (split-KV): program (b, head tile, split) walks its share of
sequence b's tokens through the block table BLOCK_N at a time, one online softmax in base 2,

    s = scale log2(e) (q_nope . k_nope + q_pe . k_pe);  m' = max(m, max s);
    l = l 2^(m - m') + sum 2^(s - m');  acc = acc 2^(m - m') + 2^(s - m') @ k_nope

and writes acc / l and its log-sum-exp. A second kernel merges the splits:
lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s. Splits are sized from each
sequence's own length (loaded on the device: no host sync, CUDA-graph friendly), so variable
lengths balance; every query row of a sequence shares its K tiles (MLA has one latent "head").
"""

from __future__ import annotations

import math

import torch

from leanmoe.kernels.dispatch import (cdiv, check_tile_config, next_power_of_2, tl, triton_jit, use_cpu_kernel,
                                      use_triton)

__all__ = ["mla_decode", "mla_decode_op", "mla_decode_cpu", "mla_decode_plan", "mla_decode_reference",
           "mla_decode_torch", "mla_decode_triton"]


def _check(q, kv_cache, block_table, cache_seqlens, head_dim_v):
    if q.dim() != 4 or kv_cache.dim() != 4:
        raise ValueError(f"mla_decode: q must be [b, s_q, h_q, d] and kv_cache [n_blocks, block_size, 1, d]; "
                         f"got {tuple(q.shape)} and {tuple(kv_cache.shape)}")
    if kv_cache.shape[2] != 1 or kv_cache.shape[3] != q.shape[3]:
        raise ValueError(f"mla_decode: kv_cache {tuple(kv_cache.shape)} must have one kv head of size d={q.shape[3]}")
    if not 0 < head_dim_v <= q.shape[3]:
        raise ValueError(f"mla_decode: head_dim_v={head_dim_v} must be in (0, {q.shape[3]}]")
    if block_table.dim() != 2 or block_table.shape[0] != q.shape[0] or cache_seqlens.shape != (q.shape[0],):
        raise ValueError(f"mla_decode: block_table must be [b, max_blocks] and cache_seqlens [b] with b={q.shape[0]}; "
                         f"got {tuple(block_table.shape)} and {tuple(cache_seqlens.shape)}")


def mla_decode_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float | None = None,
                         causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: gather its tokens through the block table, attend in fp32. -> (out, lse)."""
    _check(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h_q, d = q.shape
    bs = kv_cache.shape[1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = q.new_zeros(b, s_q, h_q, head_dim_v)
    lse = torch.full((b, h_q, s_q), float("-inf"), device=q.device, dtype=torch.float32)
    for i, n in enumerate(cache_seqlens.tolist()):
        if n == 0:
            continue
        blocks = block_table[i, : -(-n // bs)].long()
        k = kv_cache[blocks, :, 0].reshape(-1, d)[:n].float()  # [n, d]
        scores = torch.einsum("shd,nd->hsn", q[i].float(), k) * scale  # [h_q, s_q, n]
        if causal:
            q_pos = torch.arange(n - s_q, n, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(n, device=q.device)[None] > q_pos, float("-inf"))
        lse[i] = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse[i][..., None]).nan_to_num(0.0)  # rows with no key: all zero
        out[i] = torch.einsum("hsn,nv->shv", p, k[:, :head_dim_v]).to(q.dtype)
    return out, lse


# ---------------------------------------------------------------------- the batched torch path
def mla_decode_plan(block_table: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int, s_q: int, h_q: int,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `mla_decode_torch` needs from the table and lengths alone, so that a step makes it once
    for all its layers (as FlashMLA's `get_mla_metadata`): the slot each padded key position reads
    [b * S] int64, the additive score mask [b, s_q * h_q, S] (0 or -inf), and which sequences are
    empty [b, 1, 1, 1]."""
    b, n_keys = block_table.shape[0], block_table.shape[1] * block_size
    seqlens = cache_seqlens.long()
    key_pos = torch.arange(n_keys, device=block_table.device)
    slots = block_table.long().repeat_interleave(block_size, dim=1) * block_size + key_pos % block_size  # [b, S]
    slots = torch.where(key_pos[None] < seqlens[:, None], slots, torch.where(seqlens[:, None] > 0, slots[:, :1], 0))
    # query i may see keys < limit[b, i]
    limit = (seqlens[:, None] - (s_q - 1 - torch.arange(s_q, device=block_table.device))[None] if causal
             else seqlens[:, None].expand(b, s_q))
    hidden = ~(key_pos[None, None] < limit[..., None])  # [b, s_q, S]
    bias = torch.zeros(b, s_q, h_q, n_keys, device=block_table.device).masked_fill_(hidden[:, :, None], float("-inf"))
    return slots.view(-1), bias.view(b, s_q * h_q, n_keys), (seqlens == 0)[:, None, None, None]


def mla_decode_torch(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float | None = None,
                     causal: bool = False, plans: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch at once in torch (the CPU path): gather every sequence's tokens (padded to
    the longest table) with one `index_select` over the cache's slots, two batched GEMMs, softmax
    in fp32. No host sync and a fixed number of ops whatever the batch size; memory
    b * max_blocks * block_size * d per call.

    A padding position is pointed at its sequence's first slot (always visible, so finite unless
    the output is NaN anyway) and masked out of the softmax, so it adds exactly 0 and NaN in unused
    slots cannot leak; table entries past a sequence's blocks are never dereferenced, and a
    sequence with no tokens gets zeros. (Zeroing gathered padding, or advanced indexing by block,
    each cost more than the GEMMs on CPU: see docs/benchmarks.md.)

    plans: a dict the caller keeps for one set of (block_table, cache_seqlens), e.g. one engine
    step's: the `mla_decode_plan` is made on the first call and reused by the others."""
    _check(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    b, s_q, h_q, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    key = (kv_cache.shape[1], s_q, h_q, causal, tuple(block_table.shape))
    plan = None if plans is None else plans.get(key)
    if plan is None:
        plan = mla_decode_plan(block_table, cache_seqlens, kv_cache.shape[1], s_q, h_q, causal)
        if plans is not None:
            plans[key] = plan
    slots, bias, empty = plan
    n_keys = bias.shape[-1]
    k = kv_cache.view(-1, d).index_select(0, slots).view(b, n_keys, d).float()  # [b, S, d]
    scores = torch.baddbmm(bias, q.float().reshape(b, s_q * h_q, d), k.transpose(1, 2), alpha=scale)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True).masked_fill_(empty[:, 0], float("-inf"))  # [b, s_q * h_q, 1]
    p = scores.sub_(lse).exp_().nan_to_num_(0.0)  # rows with no key: all zero
    # NOTE: multiplying by all d columns and dropping the rope ones after costs (d - dv) / dv more
    # flops but no strided copy of the gathered keys (which took longer than the product on CPU)
    out = torch.bmm(p, k).view(b, s_q, h_q, d)[..., :head_dim_v]
    out = out.masked_fill(empty, 0.0)  # an empty sequence's keys all point at slot 0, which may hold anything
    return out.to(q.dtype), lse.view(b, s_q, h_q).transpose(1, 2)


# The C kernel's rows (s_q x h_q) per sequence at most: beyond, the scores and values are real matrix
# products that MKL's GEMMs in the torch path do faster (bench/kernels.py --only mla-cpu, 2-core
# AVX-512 CPU: 1.07x at 32 rows, 0.86x at 64, 0.73x at 128; 1.4-6x at 4-16 rows)
CPU_KERNEL_MAX_ROWS = 32


def mla_decode_cpu(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float | None = None,
                   causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel (leanmoe/kernels/cpu_mla.c, fp32 CPU tensors): each sequence's keys are read
    in place from their cache slots, once for the scores of all its query rows and once for the
    values, instead of gathered into a padded copy. Threads: torch's count, over (sequence,
    chunk of query rows)."""
    from leanmoe.kernels.cpu_kernels import library

    _check(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    if not use_cpu_kernel(q, kv_cache):
        raise RuntimeError("mla_decode_cpu needs fp32 CPU tensors and the built C kernels "
                           "(leanmoe.kernels.cpu_kernels.status() says why they are not)")
    lib = library()  # built: use_cpu_kernel said so
    b, s_q, h_q, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    q, kv_cache = q.contiguous(), kv_cache.contiguous()
    block_table = block_table.to(torch.int32).contiguous()
    cache_seqlens = cache_seqlens.to(torch.int32).contiguous()
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=torch.float32)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32)
    threads = torch.get_num_threads()
    chunks = max(1, min(s_q * h_q, -(-threads // max(b, 1))))  # enough work items for every thread
    rc = lib.leanmoe_mla_decode_f32(
        q.data_ptr(), kv_cache.data_ptr(), block_table.data_ptr(), cache_seqlens.data_ptr(), out.data_ptr(),
        lse.data_ptr(), b, s_q, h_q, d, head_dim_v, kv_cache.shape[1], block_table.shape[1], kv_cache.shape[0],
        scale, int(causal), chunks, threads)
    if rc == -2:
        raise ValueError(f"mla_decode_cpu: cache_seqlens {cache_seqlens.tolist()} must be in [0, "
                         f"{block_table.shape[1] * kv_cache.shape[1]}] (the block table's {block_table.shape[1]} "
                         f"blocks of {kv_cache.shape[1]} tokens)")
    if rc == -3:
        raise ValueError(f"mla_decode_cpu: the block table names blocks outside the cache's {kv_cache.shape[0]}")
    if rc != 0:
        raise MemoryError(f"mla_decode_cpu: could not allocate the score rows (batch {b}, table "
                          f"{block_table.shape[1]} blocks of {kv_cache.shape[1]})")
    return out, lse


# ---------------------------------------------------------------------- Triton kernels
@triton_jit
def _mla_decode_kernel(
    q_ptr, kv_ptr, bt_ptr, seqlens_ptr, o_ptr, lse_ptr,
    s_qb, s_qs, s_qh, s_kvb, s_kvt, s_btb, s_ob, s_or, s_os, s_lb, s_lr,
    H_Q, S_Q, DV, DR, PAGE, scale_log2,
    CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):
    """Program (b, row tile, split): rows r = i * H_Q + h of sequence b over its split of keys.
    Writes o [b, r, split, :DV] = softmax-weighted values of the split (fp32) and lse [b, r, split]
    (natural log; -inf when the split holds no visible key)."""
    b, pid_r, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_splits = tl.num_programs(2)
    rows = pid_r * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < S_Q * H_Q
    qi, qh = rows // H_Q, rows % H_Q
    dv = tl.arange(0, BLOCK_DV)
    dr = tl.arange(0, BLOCK_DR)
    q_row = q_ptr + b.to(tl.int64) * s_qb + qi * s_qs + qh * s_qh
    q_nope = tl.load(q_row[:, None] + dv[None, :], mask=row_ok[:, None] & (dv < DV)[None, :], other=0.0)
    q_pe = tl.load(q_row[:, None] + DV + dr[None, :], mask=row_ok[:, None] & (dr < DR)[None, :], other=0.0)
    if DOT_F32:
        q_nope, q_pe = q_nope.to(tl.float32), q_pe.to(tl.float32)

    seqlen = tl.load(seqlens_ptr + b)
    if CAUSAL:  # query i sits at position seqlen - S_Q + i and sees keys up to it
        last = seqlen - S_Q + qi
    else:
        last = tl.zeros_like(qi) + seqlen - 1
    chunk = tl.cdiv(tl.cdiv(seqlen, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seqlen)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        toks = n0 + tl.arange(0, BLOCK_N)
        tok_ok = toks < end
        # the block table maps token -> (block, slot); masked lanes read neither table nor cache
        blk = tl.load(bt_ptr + b.to(tl.int64) * s_btb + toks // PAGE, mask=tok_ok, other=0)
        kv_row = kv_ptr + blk.to(tl.int64) * s_kvb + (toks % PAGE) * s_kvt
        k_nope = tl.load(kv_row[:, None] + dv[None, :], mask=tok_ok[:, None] & (dv < DV)[None, :], other=0.0)
        k_pe = tl.load(kv_row[:, None] + DV + dr[None, :], mask=tok_ok[:, None] & (dr < DR)[None, :], other=0.0)
        if DOT_F32:
            k_nope, k_pe = k_nope.to(tl.float32), k_pe.to(tl.float32)
        s = (tl.dot(q_nope, tl.trans(k_nope), input_precision=PRECISION)
             + tl.dot(q_pe, tl.trans(k_pe), input_precision=PRECISION))  # [BLOCK_H, BLOCK_N]
        visible = tok_ok[None, :] & (toks[None, :] <= last[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_nope.dtype), k_nope, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = o_ptr + b.to(tl.int64) * s_ob + rows[:, None] * s_or + split * s_os + dv[None, :]
    tl.store(o_ptrs, out, mask=row_ok[:, None] & (dv < DV)[None, :])
    tl.store(lse_ptr + b.to(tl.int64) * s_lb + rows * s_lr + split, lse, mask=row_ok)


@triton_jit
def _mla_combine_kernel(o_part_ptr, lse_part_ptr, out_ptr, lse_ptr,
                        s_pb, s_pr, s_ps, s_lpb, s_lpr, s_outb, s_outs, s_outh, s_lb, s_lh,
                        H_Q, DV, N_SPLITS, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program (b, r): merge the splits of one query row; lse goes to [b, h, i] (FlashMLA's)."""
    b, r = tl.program_id(0).to(tl.int64), tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    lse_s = tl.load(lse_part_ptr + b * s_lpb + r * s_lpr + sp, mask=sp < N_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for empty splits
    total = tl.sum(w, axis=0)
    o_s = tl.load(o_part_ptr + b * s_pb + r * s_pr + sp[:, None] * s_ps + dv[None, :],
                  mask=(sp < N_SPLITS)[:, None] & (dv < DV)[None, :], other=0.0)
    out = tl.sum(o_s * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    lse = tl.where(total > 0.0, m_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    qi, qh = r // H_Q, r % H_Q
    tl.store(out_ptr + b * s_outb + qi * s_outs + qh * s_outh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)
    tl.store(lse_ptr + b * s_lb + qh * s_lh + qi, lse)


def _num_splits(q: torch.Tensor, work_tiles: int, max_len: int, block_n: int) -> int:
    """Enough (batch, head tile, split) programs to fill the GPU twice over, each split keeping at
    least a few BLOCK_N steps, rounded down to a power of two. max_len is the static bound
    max_blocks * block_size (no sync). On an H200 (docs/benchmarks.md) 4 splits ran 1.15x 5 at 64
    sequences of 16 heads x 2 tokens, and 2 as fast as 3 at 128 sequences."""
    units = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    by_occupancy = cdiv(2 * units, max(work_tiles, 1))
    by_length = max(1, max_len // (4 * block_n))
    n = max(1, min(by_occupancy, by_length, 64))
    return 1 << (n.bit_length() - 1)


def mla_decode_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      cache_seqlens: torch.Tensor, head_dim_v: int, softmax_scale: float | None = None,
                      causal: bool = False, num_splits: int | None = None, *,
                      tile_config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launcher behind `mla_decode` (same contract); num_splits overrides the split-KV
    heuristic, tile_config = (rows per program, keys per step, num_warps, num_stages) the tile
    choice (None: the measured default; bench/kernels.py --sweep times alternatives). Needs q and
    kv_cache contiguous along d, int32 block_table and cache_seqlens."""
    _check(q, kv_cache, block_table, cache_seqlens, head_dim_v)
    tile_config = check_tile_config("mla_decode", tile_config)
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("mla_decode: q and kv_cache must be contiguous along the head dim")
    if q.dtype != kv_cache.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"mla_decode: q and kv_cache must share a float dtype, got {q.dtype} and {kv_cache.dtype}")
    block_table = block_table.to(torch.int32)
    cache_seqlens = cache_seqlens.to(torch.int32)
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    b, s_q, h_q, d = q.shape
    page = kv_cache.shape[1]
    dr = d - head_dim_v
    rows = s_q * h_q
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    on_gpu = q.is_cuda
    # Measured on an H200 (bench/kernels.py --sweep, docs/benchmarks.md): with many query rows
    # (128 heads) 64 rows x 64 keys per step (829 GB/s; 619 for 64 x 32, 319 for 32 x 32); with
    # few rows (16 heads) 128 keys per step (2674 GB/s; 2246 for 64 keys). 8 warps, 2 stages.
    # The interpreter prefers wide tiles.
    if tile_config is not None:
        max_h, block_n, num_warps, num_stages = tile_config
    elif on_gpu:
        max_h, block_n, num_warps, num_stages = (64, 64, 8, 2) if rows >= 64 else (32, 128, 8, 2)
    else:
        max_h, block_n, num_warps, num_stages = 64, 64, 8, 2
    block_h = max(16, min(max_h, next_power_of_2(rows)))
    row_tiles = cdiv(rows, block_h)
    if num_splits is None:
        num_splits = _num_splits(q, b * row_tiles, block_table.shape[1] * page, block_n)
    out = torch.empty(b, s_q, h_q, head_dim_v, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h_q, s_q, device=q.device, dtype=torch.float32)
    if b == 0 or rows == 0:
        return out, lse
    o_part = torch.empty(b, rows, num_splits, head_dim_v, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b, rows, num_splits, device=q.device, dtype=torch.float32)
    kv = kv_cache[:, :, 0]  # [n_blocks, bs, d]
    dot_f32 = (not on_gpu) or q.dtype == torch.float32
    _mla_decode_kernel[(b, row_tiles, num_splits)](
        q, kv, block_table, cache_seqlens, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), block_table.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        h_q, s_q, head_dim_v, dr, page, scale * math.log2(math.e),
        CAUSAL=causal, DOT_F32=dot_f32, PRECISION="ieee" if dot_f32 else "tf32",  # fp32 dots: IEEE, not TF32
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=max(16, next_power_of_2(head_dim_v)),
        BLOCK_DR=max(16, next_power_of_2(dr)), num_warps=num_warps, num_stages=num_stages)
    _mla_combine_kernel[(b, rows)](
        o_part, lse_part, out, lse, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), h_q, head_dim_v, num_splits,
        BLOCK_S=max(2, next_power_of_2(num_splits)), BLOCK_DV=next_power_of_2(head_dim_v), num_warps=4)
    return out, lse


# ---------------------------------------------------------------------- dispatch
@torch.library.custom_op("leanmoe::mla_decode", mutates_args=())
def mla_decode_op(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  head_dim_v: int, softmax_scale: float, causal: bool) -> torch.Tensor:
    """`mla_decode` (its output only) as one opaque op for torch.compile: a compiled decode step
    calls this, and the dispatch below runs at call time, outside the traced graph. Eager callers
    use `mla_decode` itself (a custom op's dispatch costs ~10 microseconds a call)."""
    return mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)[0]


@mla_decode_op.register_fake
def _(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal):
    return q.new_empty(*q.shape[:3], head_dim_v)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int, softmax_scale: float | None = None, causal: bool = False, *,
               tile_config: tuple[int, int, int, int] | None = None,
               plans: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA-compatible paged MLA decode (see the module docstring). -> (out [b, s_q, h_q, dv],
    lse [b, h_q, s_q] fp32). tile_config: the Triton path's tile choice (see mla_decode_triton);
    plans: the torch path's per-step memo (see mla_decode_torch)."""
    if use_triton(q):
        return mla_decode_triton(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal,
                                 tile_config=tile_config)
    if q.shape[1] * q.shape[2] <= CPU_KERNEL_MAX_ROWS and use_cpu_kernel(q, kv_cache):
        return mla_decode_cpu(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    return mla_decode_torch(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, plans)
