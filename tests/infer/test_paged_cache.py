"""leanmoe/infer/paged_cache.py: the paged backend against the contiguous LatentCache and the
plain forward, with scattered block tables, cached prefixes and two-token (verify) steps."""

import torch

from leanmoe import LatentCache, ModelConfig
from leanmoe.infer.paged_cache import DecodeMetadata, PagedAttention, PagedLatentCache, PrefillMetadata
from tests.infer.helpers import make_model

BS = 4


def slots_of(table, positions):
    return [table[p // BS] * BS + p % BS for p in positions]


@torch.no_grad()
def test_prefill_and_decode_match_the_contiguous_cache():
    model = make_model()
    cfg = model.config
    lengths = [3, 9, 6]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n + 2,), generator=g) for n in lengths]
    cache = PagedLatentCache(cfg, num_blocks=20, block_size=BS)
    backend = PagedAttention(cache)
    perm = torch.randperm(20, generator=g).tolist()  # scattered, non-increasing block ids
    tables = [perm[0:4], perm[4:8], perm[8:12]]

    # packed prefill of all prompts but their last two tokens, in one [1, N] forward
    ids, pos, slot_mapping, meta, last = [], [], [], [], []
    for p, n, t in zip(prompts, lengths, tables):
        meta.append((len(ids), len(ids) + n, 0, None))
        ids += p[:n].tolist()
        pos += range(n)
        slot_mapping += slots_of(t, range(n))
        last.append(len(ids) - 1)
    backend.metadata = PrefillMetadata(torch.tensor(slot_mapping), meta)
    logits = model(torch.tensor([ids]), torch.tensor([pos]), backend)[0, last]
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        torch.testing.assert_close(logits[i], model(p[None, :n])[0, -1], atol=1e-5, rtol=1e-5)

    # a two-token decode step for all three ([B, 2], causal inside the step)
    backend.metadata = DecodeMetadata(
        torch.tensor(sum((slots_of(t, [n, n + 1]) for t, n in zip(tables, lengths)), [])),
        torch.tensor(tables, dtype=torch.int32), torch.tensor([n + 2 for n in lengths], dtype=torch.int32))
    step_ids = torch.stack([p[n:n + 2] for p, n in zip(prompts, lengths)])
    step_pos = torch.tensor([[n, n + 1] for n in lengths])
    paged = model(step_ids, step_pos, backend)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        ref_cache = LatentCache(cfg, 1, 16)
        model(p[None, :n], backend=ref_cache)
        ref_cache.advance(n)
        ref = model(p[None, n:n + 2], torch.tensor([[n, n + 1]]), backend=ref_cache)
        torch.testing.assert_close(paged[i], ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(paged[i], model(p[None])[0, n:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prefill_over_a_cached_prefix():
    model = make_model()
    cfg = model.config
    p = torch.randint(0, cfg.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    cache = PagedLatentCache(cfg, num_blocks=8, block_size=BS)
    backend = PagedAttention(cache)
    table = [5, 2, 7]
    backend.metadata = PrefillMetadata(torch.tensor(slots_of(table, range(8))), [(0, 8, 0, None)])
    model(p[None, :8], None, backend)
    # the second request starts with the same 8 tokens: compute only 8..10 over the cached prefix
    backend.metadata = PrefillMetadata(torch.tensor(slots_of(table, range(8, 11))),
                                       [(0, 3, 8, torch.tensor(slots_of(table, range(11))))])
    out = model(p[None, 8:], torch.arange(8, 11)[None], backend)
    torch.testing.assert_close(out[0], model(p[None])[0, 8:], atol=1e-5, rtol=1e-5)


def test_bytes_per_token_is_latent_only():
    tiny = ModelConfig.from_preset("tiny")
    c = PagedLatentCache(tiny, num_blocks=1, block_size=64)
    assert c.bytes_per_token == 6 * (64 + 16) * 4  # layers x (C + R) x fp32
    c = PagedLatentCache(tiny.replace(num_nextn_predict_layers=1), num_blocks=1, block_size=64)
    assert c.bytes_per_token == (6 + 1) * (64 + 16) * 4  # the MTP module's layer has its cache too
    v3 = ModelConfig.from_preset("deepseek-v3")
    per_layer_latent = v3.kv_lora_rank + v3.qk_rope_head_dim
    per_layer_expanded = v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim)
    assert per_layer_latent == 576 and round(per_layer_expanded / per_layer_latent, 1) == 71.1
