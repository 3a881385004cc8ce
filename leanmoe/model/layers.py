"""Small building blocks: RMSNorm, rotary embedding with YaRN, the SwiGLU MLP.

Shape legend: B batch, T tokens, D hidden, R rope dims (qk_rope_head_dim), F MLP width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leanmoe.config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as DeepSeek and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:  # the same math, fused (3x faster on CPU)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (Peng et al. 2023, eq. 23)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] for the rope dims, and the factor cos/sin are multiplied by.

    Without scaling this is plain RoPE. With YaRN ("NTK-by-parts", Peng et al. 2023 section 3.2),
    frequencies that rotate fewer than `beta_slow` times over the original context are interpolated
    (divided by `factor`), those rotating more than `beta_fast` times are kept, and a linear ramp
    blends the band in between. The correction range is rounded outward (floor/ceil), as in
    DeepSeek's reference code and transformers.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq_extra = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    yarn = cfg.yarn
    if yarn is None:
        return freq_extra, 1.0
    factor = float(yarn["factor"])
    orig = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(n_rot: float) -> float:  # the dim whose wavelength fits n_rot times in `orig`
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = freq_extra / factor * ramp + freq_extra * (1 - ramp)
    # cos/sin are scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim); the softmax scale
    # separately gets mscale(factor, mscale_all_dim)^2 (see `softmax_scale`). For V3 both are 1.0.
    mscale, mscale_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and mscale_all:
        attn_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        attn_factor = _yarn_mscale(factor)
    return inv_freq, attn_factor


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 when scaling is on."""
    scale = cfg.qk_head_dim ** -0.5
    yarn = cfg.yarn
    if yarn is not None and yarn.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(yarn["factor"]), yarn["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, R/2], looked up by position id."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        device = torch.device(device if device is not None else self.cos.device)
        shape = (self.cfg.max_position_embeddings, self.cfg.qk_rope_head_dim // 2)
        if device.type == "meta":  # a model built on meta gets real tables once it is loaded
            self.cos, self.sin = torch.empty(shape, device=device), torch.empty(shape, device=device)
            return
        inv_freq, attn_factor = rope_inv_freq(self.cfg)
        t = torch.arange(self.cfg.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)  # [P, R/2]
        self.cos = (freqs.cos() * attn_factor).to(device)
        self.sin = (freqs.sin() * attn_factor).to(device)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] (or [T]) -> cos, sin [B, T, R/2] in fp32."""
        return self.cos[position_ids], self.sin[position_ids]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim, as DeepSeek lays them out.

    x [B, T, (heads,) R]; cos/sin [B, T, R/2]. The result puts the rotated even elements first and
    the odd ones second ("de-interleaved"), like transformers: a fixed permutation of the rope
    dims applied to both q and k, which leaves every q.k dot product unchanged.
    """
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    dtype = x.dtype
    x = x.float()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Also the shared experts of an MoE layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
