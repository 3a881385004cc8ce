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

`mla_decode_reference` is the obvious gather-and-softmax in fp32; `mla_decode` is the dispatch
point every caller uses.
"""

from __future__ import annotations

import torch

__all__ = ["mla_decode", "mla_decode_reference"]


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


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int, softmax_scale: float | None = None, causal: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA-compatible paged MLA decode (see the module docstring). -> (out [b, s_q, h_q, dv],
    lse [b, h_q, s_q] fp32)."""
    return mla_decode_reference(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
