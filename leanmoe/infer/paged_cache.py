"""The paged latent KV cache and the attention backend that reads and writes it.

Shape legend: L cache layers (decoder layers + MTP modules), NB blocks, bs tokens per block,
d = C + R latent values per token (kv_lora_rank + qk_rope_head_dim), B sequences, T query tokens
per sequence, N tokens in a packed prefill, H heads.

Per token and layer the cache stores MLA's normalised latent c_kv [C] and the rotated shared key
k_pe [R] -- nothing per head: 576 values per layer for DeepSeek-V3, against 128 * (192 + 128) = 40960
for the per-head keys and values of an expanded cache (71x).
A token at position p of a sequence lives in slot `block_table[p // bs] * bs + p % bs`.

Two step kinds, chosen by the metadata the model runner sets before each forward:

* prefill: the new tokens of several sequences are packed into one [1, N] row. Latents are
  written to their slots, then each sequence attends with MLA's expanded path over its cached
  prefix (read back from its blocks) plus its new tokens (bottom-right causal).
* decode: [B, T] with T = 1 (or 2 when verifying a draft). The query is absorbed into latent
  space, packed as FlashMLA's q = [W_UK^T q_nope ; q_pe] [B, T, H, d], and `mla_decode` attends
  over the paged cache directly; W_UV maps the latent output back per head (`paged_mla_attend`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanmoe.config import ModelConfig
from leanmoe.model.attention import MLA

__all__ = ["PagedLatentCache", "PagedAttention", "PrefillMetadata", "DecodeMetadata", "paged_mla_attend",
           "write_latents"]


class PagedLatentCache:
    """kv [L, NB, bs, d]: allocated once, up front (the engine sizes it; nothing grows later)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.num_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_lora_rank, self.latent_dim = cfg.kv_lora_rank, cfg.latent_dim
        self.kv = torch.zeros(self.num_layers, num_blocks, block_size, cfg.latent_dim, device=device, dtype=dtype)
        # views made once: [NB * bs, d] for slot writes, [NB, bs, 1, d] as FlashMLA's kv_cache
        self.slots = [self.kv[i].view(-1, cfg.latent_dim) for i in range(self.num_layers)]
        self.paged = [self.kv[i].unsqueeze(2) for i in range(self.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token occupies over all layers (the MTP modules' included)."""
        return self.num_layers * self.latent_dim * self.kv.element_size()


@dataclass
class PrefillMetadata:
    """slot_mapping [N] int64: cache slot of each packed new token.
    seqs: per sequence (start, end) of its new tokens in the packed row, its cached prefix length,
    and (when that is > 0) the slots of all its positions [n] int64 to read the prefix back."""

    slot_mapping: torch.Tensor
    seqs: list[tuple[int, int, int, torch.Tensor | None]]


@dataclass
class DecodeMetadata:
    """slot_mapping [B*T] int64; block_table [B, max_blocks] int32; cache_seqlens [B] int32
    (valid tokens per sequence, this step's T included). plans: the CPU attention's per-step
    memo, filled by the first layer (leanmoe.kernels.mla_decode.mla_decode_torch)."""

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    plans: dict = field(default_factory=dict)


class PagedAttention:
    """leanmoe.model.attention.AttentionBackend over a PagedLatentCache. The model runner sets
    `metadata` before each forward; every layer (MTP modules included) then stores its latents
    and attends through here."""

    def __init__(self, cache: PagedLatentCache):
        self.cache = cache
        self.metadata: PrefillMetadata | DecodeMetadata | None = None

    def attend(self, attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor:
        """q_nope [B, T, H, N], q_pe [B, T, H, R], kv_c [B, T, C], k_pe [B, T, R] -> [B, T, H*V]."""
        meta = self.metadata
        slots = self.cache.slots[attn.layer_idx]
        write_latents(slots, meta.slot_mapping, torch.cat([kv_c, k_pe], dim=-1).flatten(0, 1).to(slots.dtype))
        if isinstance(meta, PrefillMetadata):
            return self._prefill(attn, meta, slots, q_nope, q_pe, kv_c, k_pe)
        return self._decode(attn, meta, q_nope, q_pe)

    def _prefill(self, attn: MLA, meta: PrefillMetadata, slots: torch.Tensor, q_nope, q_pe, kv_c, k_pe) -> torch.Tensor:
        c = self.cache.kv_lora_rank
        outs = []
        for start, end, cached, all_slots in meta.seqs:
            if cached == 0:  # keys are exactly this step's tokens
                kv_c_s, k_pe_s = kv_c[:, start:end], k_pe[:, start:end]
            else:  # prefix from the cache, then the new tokens just written
                past = slots.index_select(0, all_slots)[None]  # [1, S, d]
                kv_c_s, k_pe_s = past[..., :c].to(kv_c.dtype), past[..., c:].to(k_pe.dtype)
            outs.append(attn.attend_expanded(q_nope[:, start:end], q_pe[:, start:end], kv_c_s, k_pe_s))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _decode(self, attn: MLA, meta: DecodeMetadata, q_nope, q_pe) -> torch.Tensor:
        # q = [W_UK^T q_nope ; q_pe] [B, T, H, C+R] -> mla_decode (FlashMLA's contract) -> W_UV
        return paged_mla_attend(attn, q_nope, q_pe, self.cache.paged[attn.layer_idx], meta.block_table,
                                meta.cache_seqlens, meta.plans)


@torch.library.custom_op("leanmoe::write_latents", mutates_args=("slots",))
def _write_latents_op(slots: torch.Tensor, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
    slots.index_copy_(0, slot_mapping, latents)


@_write_latents_op.register_fake
def _(slots, slot_mapping, latents):
    return None


def write_latents(slots: torch.Tensor, slot_mapping: torch.Tensor, latents: torch.Tensor) -> None:
    """slots[slot_mapping] = latents, in place: slots [NB * bs, d] (a view of one layer of the
    cache), slot_mapping [N] int64, latents [N, d].

    NOTE: under torch.compile this is an opaque op that mutates its argument. Traced as a plain
    index_copy_ into a view of the cache, functionalisation copies the whole cache back into
    itself for every layer (a compiled batch-16 decode step took 3x the eager one)."""
    if torch.compiler.is_compiling():
        _write_latents_op(slots, slot_mapping, latents)
    else:
        slots.index_copy_(0, slot_mapping, latents)


def paged_mla_attend(attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                     block_table: torch.Tensor, cache_seqlens: torch.Tensor, plans: dict | None = None) -> torch.Tensor:
    """One MLA layer's absorbed attention over a paged latent cache: what a paged
    `AttentionBackend.attend` calls after writing this step's latents into `kv_cache`.

    attn: the layer's `leanmoe.model.attention.MLA`; q_nope [B, T, H, N], q_pe [B, T, H, R]
    (rotated); kv_cache [n_blocks, bs, 1, C + R] holding [c_kv ; k_pe] per token, this step's T
    included; cache_seqlens [B] counts them. -> [B, T, H*V] (before o_proj), causal over the T new
    tokens as `MLA.attend_absorbed`. plans: a per-step memo shared by the layers (DecodeMetadata.plans).
    """
    q = torch.cat([attn.absorb_q(q_nope), q_pe], dim=-1).to(kv_cache.dtype)  # [B, T, H, C + R]
    if torch.compiler.is_compiling():  # one opaque op: the kernel dispatch is not traced
        from leanmoe.kernels.mla_decode import mla_decode_op

        o_lat = mla_decode_op(q.contiguous(), kv_cache, block_table, cache_seqlens, attn.kv_lora_rank,
                              attn.scale, True)
    else:
        o_lat, _ = _mla_decode()(q.contiguous(), kv_cache, block_table, cache_seqlens, attn.kv_lora_rank,
                                 softmax_scale=attn.scale, causal=True, plans=plans)
    return attn.unabsorb_o(o_lat.to(q_nope.dtype))


def _mla_decode():
    # NOTE: imported on first use so `import leanmoe` loads no Triton (its import takes seconds)
    from leanmoe.kernels.mla_decode import mla_decode

    return mla_decode
