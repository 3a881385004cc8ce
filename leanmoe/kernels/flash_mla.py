"""FlashMLA's Python API (deepseek-ai/FlashMLA, `import flash_mla`) on leanmoe's MLA decode.

    import leanmoe.kernels.flash_mla as flash_mla        # instead of `import flash_mla`
    sched_meta, num_splits = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                                sched_meta, num_splits, causal=True)

Shapes (FlashMLA's): q [b, s_q, h_q, d], k_cache [n_blocks, page_block_size, 1, d] (MLA's one
latent "head": normalised c_kv then the rotated k_pe), block_table [b, max_blocks] int32,
cache_seqlens [b] int32 -> out [b, s_q, h_q, head_dim_v] in q's dtype, lse [b, h_q, s_q] fp32
(natural log). FlashMLA's convention for a query row that sees no key (an empty sequence, or a
causal row before the first key): out = 0 and lse = +inf (leanmoe.kernels.mla_decode reports
-inf there; this face converts). softmax_scale defaults to d ** -0.5.

Metadata: leanmoe's kernel sizes its split-KV work from cache_seqlens on the device, so there is
no schedule to plan. `get_mla_metadata` takes either interface (the old one,
get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, ...), or the current one,
get_mla_metadata()) and returns (FlashMLASchedMeta(), None), which flash_mla_with_kvcache accepts
in its tile_scheduler_metadata / num_splits slots (anything passed there is ignored).

What leanmoe lacks raises NotImplementedError naming it: an FP8 KV cache (is_fp8_kvcache),
several KV heads (k_cache.shape[2] > 1), sparse attention (indices, topk_length and the extra_*
cache), attention sinks (attn_sink), and FlashMLA's prefill and sparse-prefill kernels
(flash_attn_varlen_func and friends, flash_mla_sparse_fwd).
"""

from __future__ import annotations

import dataclasses

import torch

from leanmoe.kernels.mla_decode import mla_decode

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "FlashMLASchedMeta", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_mla_sparse_fwd"]


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Stands in for FlashMLA's tile-scheduler metadata; leanmoe plans nothing ahead (see above)."""


def _unsupported(name: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"{name}: {what} is not supported by leanmoe, which offers FlashMLA's dense paged "
                               f"decode only (a bf16/fp16/fp32 latent cache with one KV head)")


def get_mla_metadata(*args, **kwargs) -> tuple[FlashMLASchedMeta, None]:
    """FlashMLA's metadata call, old interface (cache_seqlens, num_q_tokens_per_head_k,
    num_heads_k, num_heads_q=None, is_fp8_kvcache=False, topk=None) or current (no arguments).
    -> (FlashMLASchedMeta(), None). Raises NotImplementedError for what the decode cannot do."""
    old = dict(zip(("cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q", "is_fp8_kvcache",
                    "topk"), args))
    old.update(kwargs)
    if old.get("num_heads_k", 1) != 1:
        raise _unsupported("get_mla_metadata", f"num_heads_k={old['num_heads_k']} (several KV heads)")
    if old.get("is_fp8_kvcache"):
        raise _unsupported("get_mla_metadata", "an FP8 KV cache (is_fp8_kvcache=True)")
    if old.get("topk") is not None:
        raise _unsupported("get_mla_metadata", "sparse attention (topk)")
    return FlashMLASchedMeta(), None


def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor | None,
                           cache_seqlens: torch.Tensor | None, head_dim_v: int, tile_scheduler_metadata=None,
                           num_splits=None, softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices: torch.Tensor | None = None,
                           attn_sink: torch.Tensor | None = None, extra_k_cache: torch.Tensor | None = None,
                           extra_indices_in_kvcache: torch.Tensor | None = None,
                           topk_length: torch.Tensor | None = None,
                           extra_topk_length: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paged MLA decode with FlashMLA's arguments (see the module docstring).
    -> (out [b, s_q, h_q, head_dim_v], lse [b, h_q, s_q] fp32, +inf for rows that see no key)."""
    name = "flash_mla_with_kvcache"
    if is_fp8_kvcache:
        raise _unsupported(name, "an FP8 KV cache (is_fp8_kvcache=True)")
    if indices is not None or topk_length is not None:
        raise _unsupported(name, "sparse attention (indices / topk_length)")
    if extra_k_cache is not None or extra_indices_in_kvcache is not None or extra_topk_length is not None:
        raise _unsupported(name, "an extra KV cache (extra_k_cache / extra_indices_in_kvcache / extra_topk_length)")
    if attn_sink is not None:
        raise _unsupported(name, "attention sinks (attn_sink)")
    if k_cache.dim() == 4 and k_cache.shape[2] != 1:
        raise _unsupported(name, f"{k_cache.shape[2]} KV heads (k_cache [n_blocks, block_size, h_kv, d] with h_kv > 1)")
    if block_table is None or cache_seqlens is None:
        raise ValueError(f"{name}: dense attention needs block_table and cache_seqlens")
    out, lse = mla_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal)
    # FlashMLA's convention: a row with no visible key has lse = +inf (its output is already 0)
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))


def flash_attn_varlen_func(*args, **kwargs):
    raise _unsupported("flash_attn_varlen_func", "FlashMLA's dense prefill (MHA over varlen q/k/v)")


def flash_attn_varlen_qkvpacked_func(*args, **kwargs):
    raise _unsupported("flash_attn_varlen_qkvpacked_func", "FlashMLA's dense prefill (MHA over varlen q/k/v)")


def flash_attn_varlen_kvpacked_func(*args, **kwargs):
    raise _unsupported("flash_attn_varlen_kvpacked_func", "FlashMLA's dense prefill (MHA over varlen q/k/v)")


def flash_mla_sparse_fwd(*args, **kwargs):
    raise _unsupported("flash_mla_sparse_fwd", "sparse attention prefill (indices)")
