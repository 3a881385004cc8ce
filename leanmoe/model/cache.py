"""A contiguous latent KV cache: the simple reference for cached (absorbed-MLA) decoding.

Each layer stores C + R values per token ([B, S_max, C + R]): MLA's normalised latent c_kv and the
rotated shared key k_pe, nothing per head. The inference engine's paged cache stores the same
values in fixed-size blocks; this one keeps every sequence in the batch at the same length.
"""

from __future__ import annotations

import torch

from leanmoe.config import ModelConfig
from leanmoe.model.attention import MLA


class LatentCache:
    """Usage: cache = LatentCache(cfg, batch, max_len); logits = model(ids, pos, backend=cache);
    cache.advance(ids.shape[1]); repeat with the next tokens."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        self.kv_lora_rank = cfg.kv_lora_rank
        self.kv = torch.zeros(n_layers, batch_size, max_len, cfg.latent_dim, device=device, dtype=dtype)
        self.length = 0  # tokens already committed for every sequence

    def attend(self, attn: MLA, q_nope, q_pe, kv_c, k_pe) -> torch.Tensor:
        t = q_nope.shape[1]
        end = self.length + t
        if end > self.kv.shape[2]:
            raise ValueError(f"LatentCache holds {self.kv.shape[2]} tokens; {end} requested")
        layer = self.kv[attn.layer_idx]
        layer[:, self.length:end] = torch.cat([kv_c, k_pe], dim=-1).to(layer.dtype)
        past = layer[:, :end]
        return attn.attend_absorbed(q_nope, q_pe, past[..., : self.kv_lora_rank].to(kv_c.dtype),
                                    past[..., self.kv_lora_rank:].to(k_pe.dtype))

    def advance(self, n: int) -> None:
        """Commit the n tokens just written by a forward pass."""
        self.length += n

    def nbytes_per_token(self) -> int:
        """Cache bytes per token over all layers."""
        return self.kv.shape[0] * self.kv.shape[3] * self.kv.element_size()
