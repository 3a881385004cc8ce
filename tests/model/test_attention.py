import pytest
import torch

from leanmoe.model import LatentCache, Transformer
from leanmoe.model.attention import MLA, causal_mask, latent_attention
from leanmoe.model.layers import RMSNorm, RotaryEmbedding, apply_rope, rope_inv_freq, softmax_scale
from tests.util import micro_config


def _mla(cfg):
    attn = MLA(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return attn


@pytest.mark.parametrize("q_lora_rank", [None, 16])
@pytest.mark.parametrize("t", [1, 7])
def test_absorbed_equals_expanded(q_lora_rank, t):
    cfg = micro_config(q_lora_rank=q_lora_rank)
    attn, rope = _mla(cfg), RotaryEmbedding(cfg)
    x = torch.randn(2, t, cfg.hidden_size)
    cos, sin = rope(torch.arange(t)[None])
    q_nope, q_pe, kv_c, k_pe = attn.project(x, cos, sin)
    expanded = attn.attend_expanded(q_nope, q_pe, kv_c, k_pe)
    absorbed = attn.attend_absorbed(q_nope, q_pe, kv_c, k_pe)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-4)


def test_expanded_with_prefix_keys_matches_full_sequence():
    """Prefill of the last 3 tokens against 8 keys equals the tail of the full causal pass."""
    cfg = micro_config()
    attn, rope = _mla(cfg), RotaryEmbedding(cfg)
    x = torch.randn(1, 8, cfg.hidden_size)
    cos, sin = rope(torch.arange(8)[None])
    q_nope, q_pe, kv_c, k_pe = attn.project(x, cos, sin)
    full = attn.attend_expanded(q_nope, q_pe, kv_c, k_pe)
    tail = attn.attend_expanded(q_nope[:, 5:], q_pe[:, 5:], kv_c, k_pe)
    torch.testing.assert_close(tail, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_cached_decode_equals_full_forward():
    cfg = micro_config()
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache(cfg, batch_size=2, max_len=12)
        prefill = model(ids[:, :5], backend=cache)
        cache.advance(5)
        steps = [prefill]
        for i in range(5, 12):
            steps.append(model(ids[:, i:i + 1], position_ids=torch.tensor([[i]]), backend=cache))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.nbytes_per_token() == (cfg.num_hidden_layers + 1) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_latent_attention_masks_and_sums_to_convex_combination():
    q_lat, q_pe = torch.randn(1, 3, 2, 5), torch.randn(1, 3, 2, 4)
    kv_c, k_pe = torch.randn(1, 6, 5), torch.randn(1, 6, 4)
    mask = causal_mask(3, 6, "cpu")
    assert mask.shape == (1, 3, 6) and mask[0, 0, :4].all() and not mask[0, 0, 4:].any()
    o = latent_attention(q_lat, q_pe, kv_c, k_pe, 0.5, mask)
    # the first query sees keys 0..3 only: changing key 5 leaves it unchanged
    kv_c2 = kv_c.clone()
    kv_c2[:, 5] += 10
    o2 = latent_attention(q_lat, q_pe, kv_c2, k_pe, 0.5, mask)
    torch.testing.assert_close(o[:, 0], o2[:, 0])
    assert not torch.allclose(o[:, 2], o2[:, 2])


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


def test_rmsnorm():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # weight is fp32; as in HF
