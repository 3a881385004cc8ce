"""Multi-head latent attention (MLA; DeepSeek-V2 section 2.1), with two interchangeable paths.

Shape legend: B batch, T query tokens, S key tokens, H heads, D hidden, C kv_lora_rank (the latent),
R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim.

Every token is compressed to a latent c_kv [C] (after kv_a_layernorm) plus one rotary key k_pe [R]
shared by all heads. Keys and values are decompressed from the latent by kv_b_proj, whose weight
splits per head into W_UK [H, N, C] and W_UV [H, V, C]:

    k_nope[s, h] = W_UK[h] @ c_kv[s]            v[s, h] = W_UV[h] @ c_kv[s]
    score[t, s, h] = q_nope[t, h] . k_nope[s, h] + q_pe[t, h] . k_pe[s]

* expanded path (training, prefill): decompress K and V for every head, then
  `scaled_dot_product_attention`. Cheap when T ~ S.
* absorbed path (decode): by associativity q_nope . (W_UK c) = (W_UK^T q_nope) . c, so the query is
  folded into latent space once (q_lat [H, C]) and attention runs directly over the cached
  [C + R] latents; the output is mapped back with W_UV. Only C + R values per token are cached
  (576 for V3, vs 2 * 128 * 192 = 49152 for the expanded K/V).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from leanmoe.config import ModelConfig
from leanmoe.model.layers import RMSNorm, apply_rope, softmax_scale


class AttentionBackend(Protocol):
    """Where the latents of past tokens live. The model calls `attend` once per layer; an
    implementation stores this step's latents (kv_c, k_pe) and runs attention over all of them,
    usually with `MLA.attend_absorbed`. leanmoe.model.cache.LatentCache is the contiguous
    reference; the inference engine provides a paged one."""

    def attend(self, attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor: ...


def latent_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor,
                     scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference attention in latent space (the math FlashMLA implements).

    q_lat [B, T, H, C], q_pe [B, T, H, R], kv_c [B, S, C], k_pe [B, S, R], mask [B or 1, T, S] bool
    (True = may attend) -> o_lat [B, T, H, C]. Scores and softmax in fp32.
    """
    scores = torch.einsum("bthc,bsc->bhts", q_lat.float(), kv_c.float())
    scores = scores + torch.einsum("bthr,bsr->bhts", q_pe.float(), k_pe.float())
    scores = scores * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    p = scores.softmax(dim=-1)
    return torch.einsum("bhts,bsc->bthc", p, kv_c.float()).to(q_lat.dtype)


def causal_mask(t: int, s: int, device: torch.device | str) -> torch.Tensor:
    """[1, T, S] bool, bottom-right aligned: query i (at absolute position S - T + i) sees keys <= it."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    return (torch.arange(s, device=device)[None, :] <= q_pos)[None]


class MLA(nn.Module):
    """MLA for one layer. Parameter names follow HF DeepseekV3 (`self_attn.*`)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        d, h, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=False)

    # ------------------------------------------------------------------ projections
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D] -> q_nope [B, T, H, N], q_pe [B, T, H, R], kv_c [B, T, C], k_pe [B, T, R].

        kv_c is normalised and k_pe rotated: both are exactly what a latent cache stores.
        """
        b, t, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin), self.kv_a_layernorm(kv_c), apply_rope(k_pe, cos, sin)

    def _wkv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight [H*(N+V), C] split into W_UK [H, N, C] and W_UV [H, V, C]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    # NOTE: both as one bmm over heads on views of kv_b_proj.weight (no copy: each head's matrix is
    # contiguous, or transposed, which BLAS reads as is); einsum took 1.2-2x longer at decode sizes
    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [..., H, N] -> q_lat [..., H, C] = W_UK^T q_nope."""
        lead = q_nope.shape[:-2]
        q_HLN = q_nope.reshape(-1, self.n_heads, self.nope_dim).transpose(0, 1)
        return torch.bmm(q_HLN, self._wkv_b()[0]).transpose(0, 1).reshape(*lead, self.n_heads, self.kv_lora_rank)

    def unabsorb_o(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat [..., H, C] -> per-head values [..., H*V] = W_UV o_lat (before o_proj)."""
        lead = o_lat.shape[:-2]
        o_HLC = o_lat.reshape(-1, self.n_heads, self.kv_lora_rank).transpose(0, 1)
        return torch.bmm(o_HLC, self._wkv_b()[1].transpose(1, 2)).transpose(0, 1).reshape(*lead, self.n_heads * self.v_dim)

    # ------------------------------------------------------------------ the two paths
    def attend_expanded(self, q_nope, q_pe, kv_c, k_pe) -> torch.Tensor:
        """Causal attention with K/V decompressed per head. q [B, T, H, *], kv [B, S, *] with
        S >= T (the last T keys are the queries' own) -> [B, T, H*V]."""
        b, t, h, _ = q_nope.shape
        s = kv_c.shape[1]
        kv = self.kv_b_proj(kv_c).view(b, s, h, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, N+R]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, s, h, self.rope_dim)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B, H, S, V]
        qk_dim = self.nope_dim + self.rope_dim
        if self.v_dim < qk_dim:
            # NOTE: flash SDPA kernels (CPU and CUDA) need equal q/k/v head sizes; zero-padding V
            # costs a little extra P.V work and avoids the math path that materialises [T, S].
            v = F.pad(v, (0, qk_dim - self.v_dim))
        if s == t:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t, s, q.device), scale=self.scale)
        return o[..., : self.v_dim].transpose(1, 2).reshape(b, t, h * self.v_dim)

    def attend_absorbed(self, q_nope, q_pe, kv_c, k_pe, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over latents: q [B, T, H, *], kv_c [B, S, C], k_pe [B, S, R] -> [B, T, H*V].
        mask [B or 1, T, S] bool; None means bottom-right causal."""
        if mask is None:
            mask = causal_mask(q_nope.shape[1], kv_c.shape[1], q_nope.device)
        o_lat = latent_attention(self.absorb_q(q_nope), q_pe, kv_c, k_pe, self.scale, mask)
        return self.unabsorb_o(o_lat)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. Without a backend: causal self-attention over x (expanded
        path). With one: the backend stores this step's latents and attends (absorbed path)."""
        q_nope, q_pe, kv_c, k_pe = self.project(x, cos, sin)
        if backend is None:
            o = self.attend_expanded(q_nope, q_pe, kv_c, k_pe)
        else:
            o = backend.attend(self, q_nope, q_pe, kv_c, k_pe)
        return self.o_proj(o)
