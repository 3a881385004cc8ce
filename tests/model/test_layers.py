import math

import pytest
import torch
import torch.nn.functional as F

from leanmoe.model.layers import (
    MLP,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
    rope_inv_freq,
    softmax_scale,
)
from tests.util import micro_config


def test_rope_interleaved_pairs_and_relative_position():
    cfg = micro_config(rope_scaling=None)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(1, 1, 4)
    cos, sin = rope(torch.tensor([[3]]))
    y = apply_rope(x, cos, sin)
    # pair (x0, x1) rotates by angle 3 * inv_freq[0]; output lists rotated evens, then odds
    theta = 3 * rope_inv_freq(cfg)[0][0]
    c, s = torch.cos(theta), torch.sin(theta)
    torch.testing.assert_close(y[0, 0, 0], x[0, 0, 0] * c - x[0, 0, 1] * s)
    torch.testing.assert_close(y[0, 0, 2], x[0, 0, 1] * c + x[0, 0, 0] * s)
    # q.k depends only on the position difference
    q, k = torch.randn(1, 1, 4), torch.randn(1, 1, 4)

    def dot(i, j):
        ci, si = rope(torch.tensor([[i]]))
        cj, sj = rope(torch.tensor([[j]]))
        return (apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum()

    torch.testing.assert_close(dot(5, 2), dot(13, 10))


def test_yarn_matches_formula_against_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = micro_config(qk_rope_head_dim=16, rope_theta=10000.0)
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "rope_scaling"})
    inv_hf, factor_hf = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv, factor = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, inv_hf.float())
    assert factor == pytest.approx(factor_hf)
    # softmax scale grows by mscale(factor, mscale_all_dim)^2 = (0.1 * 0.8 * ln 4 + 1)^2
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * (0.1 * 0.8 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)


def test_plain_rope_frequencies_and_no_scaling():
    cfg = micro_config(rope_scaling=None, qk_rope_head_dim=8, rope_theta=10000.0)
    inv, factor = rope_inv_freq(cfg)
    expected = torch.tensor([10000.0 ** (-i / 8) for i in (0, 2, 4, 6)])
    torch.testing.assert_close(inv, expected, rtol=1e-6, atol=0)
    assert factor == 1.0
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5, rel=1e-12)


def test_yarn_keeps_fast_frequencies_and_interpolates_slow_ones():
    cfg = micro_config(qk_rope_head_dim=32, rope_theta=10000.0)  # factor 4, original context 32
    plain, _ = rope_inv_freq(micro_config(qk_rope_head_dim=32, rope_theta=10000.0, rope_scaling=None))
    inv, factor = rope_inv_freq(cfg)
    torch.testing.assert_close(inv[0], plain[0], rtol=1e-6, atol=0)  # highest frequency: extrapolated
    torch.testing.assert_close(inv[-1], plain[-1] / 4, rtol=1e-6, atol=0)  # lowest: divided by factor
    assert ((inv <= plain * (1 + 1e-6)) & (inv >= plain / 4 * (1 - 1e-6))).all()
    # mscale 1.0 over mscale_all_dim 0.8 (eq. 23 of the YaRN paper, per DeepSeek's split)
    assert factor == pytest.approx((0.1 * math.log(4) + 1) / (0.08 * math.log(4) + 1), rel=1e-9)


def test_rotary_tables_match_the_inverse_frequencies_and_lookup_shapes():
    cfg = micro_config()
    rope = RotaryEmbedding(cfg)
    inv, factor = rope_inv_freq(cfg)
    assert rope.cos.shape == (cfg.max_position_embeddings, cfg.qk_rope_head_dim // 2)
    pos = torch.tensor([[0, 5, 127]])
    cos, sin = rope(pos)
    assert cos.shape == (1, 3, cfg.qk_rope_head_dim // 2) and cos.dtype == torch.float32
    angles = pos[..., None].float() * inv
    torch.testing.assert_close(cos, angles.cos() * factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sin, angles.sin() * factor, rtol=1e-5, atol=1e-6)
    # position 0 is the identity rotation (times the YaRN factor)
    torch.testing.assert_close(cos[0, 0], torch.full_like(cos[0, 0], factor), rtol=0, atol=1e-7)
    # a model built on meta gets placeholder tables of the right shape, real ones on reset
    rope.reset_buffers("meta")
    assert rope.cos.is_meta and rope.cos.shape == (cfg.max_position_embeddings, cfg.qk_rope_head_dim // 2)
    rope.reset_buffers("cpu")
    torch.testing.assert_close(rope(pos)[0], cos, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_apply_rope_with_heads_preserves_norm_and_dtype(dtype, tol):
    cfg = micro_config(rope_scaling=None, qk_rope_head_dim=6)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(2, 5, 3, 6).to(dtype)  # [B, T, heads, R]
    cos, sin = rope(torch.arange(5).expand(2, 5))
    y = apply_rope(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype
    # rotations keep each pair's length
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=tol, atol=tol)
    # each head is rotated the same way as a 3-D input
    torch.testing.assert_close(y[:, :, 1], apply_rope(x[:, :, 1], cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 3, 5), (7, 5)])
def test_rmsnorm_matches_formula_with_eps(shape):
    norm = RMSNorm(5, eps=0.5)  # a large eps, so dropping it would show
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0]))
    x = torch.randn(*shape) * 0.3
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    # zero input stays finite (eps) and a scaled input normalises to the same output when eps is small
    assert torch.isfinite(norm(torch.zeros(shape))).all()
    small = RMSNorm(5, eps=1e-12)
    torch.testing.assert_close(small(x * 1000), small(x), rtol=1e-5, atol=1e-6)
    assert "5, eps=1e-12" in repr(small)


def test_rmsnorm_fp32_gradients_match_the_formula():
    # fp32 takes torch's fused rms_norm: its input and weight gradients are the formula's
    norm = RMSNorm(8, eps=1e-3)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-1, 2, 8))
    x = torch.randn(3, 4, 8, requires_grad=True)
    g = torch.randn(3, 4, 8)
    (norm(x) * g).sum().backward()
    fused = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    ((norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)) * g).sum().backward()
    torch.testing.assert_close(fused[0], x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], norm.weight.grad, rtol=1e-5, atol=1e-6)


def test_rmsnorm_bf16_is_computed_in_fp32():
    norm = RMSNorm(64)
    x = torch.randn(4, 64) * 100
    ref = norm(x)
    y = norm(x.bfloat16())
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        norm.to(torch.bfloat16)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(1, 1, 6), (2, 7, 6), (3, 6)])
def test_mlp_is_swiglu(shape):
    mlp = MLP(6, 10)
    assert mlp.gate_proj.weight.shape == (10, 6) and mlp.up_proj.weight.shape == (10, 6)
    assert mlp.down_proj.weight.shape == (6, 10)
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = torch.randn(*shape)
    y = mlp(x)
    assert y.shape == x.shape
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    expected = (F.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # silu gate: a zero gate weight switches the layer off
    with torch.no_grad():
        mlp.gate_proj.weight.zero_()
    torch.testing.assert_close(mlp(x), torch.zeros_like(x), rtol=0, atol=0)


def test_rmsnorm():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # weight is fp32; as in HF
