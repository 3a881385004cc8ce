import pytest
import torch

from leanmoe.model import LatentCache, Transformer
from leanmoe.model.attention import MLA, causal_mask, latent_attention
from leanmoe.model.layers import RotaryEmbedding
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
