"""leanmoe/infer/block_manager.py: allocation, refcounts, prefix sharing (verified), no leaks. No torch."""

import random

import pytest

from leanmoe.infer.block_manager import BlockManager
from leanmoe.infer.sampling_params import SamplingParams
from leanmoe.infer.sequence import Sequence

P = SamplingParams(temperature=0)


def seq(tokens):
    return Sequence(list(tokens), P)


def finish_prefill(bm, s):
    """What the engine does after a prefill step: all prompt positions cached, one token sampled."""
    s.token_ids.append(7)
    s.num_cached_tokens = len(s) - 1
    bm.register(s)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = seq(range(9)), seq(range(100, 104))
    assert bm.allocate(a) and bm.allocate(b)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert len(set(a.block_table) | set(b.block_table)) == 4
    assert bm.num_free_blocks == 6
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10 and a.block_table == [] and a.num_cached_tokens == 0
    bm.check()


def test_allocation_fails_without_partial_allocation():
    bm = BlockManager(num_blocks=3, block_size=4)
    big = seq(range(13))  # 4 blocks
    assert not bm.allocate(big)
    assert big.block_table == [] and bm.num_free_blocks == 3
    s = seq(range(8))
    assert bm.allocate(s)
    assert not bm.grow(s, 13) and len(s.block_table) == 2  # would need 2 more, 1 free
    assert bm.grow(s, 12) and len(s.block_table) == 3
    bm.check()


def test_prefix_blocks_are_shared_and_refcounted():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(10, 21))  # 11 tokens: blocks [0:4], [4:8] full, [8:11] partial
    a = seq(prompt)
    assert bm.allocate(a) and a.num_cached_tokens == 0
    finish_prefill(bm, a)
    b = seq(prompt[:9] + [99, 98])  # shares the first two blocks, differs in the third
    assert bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and b.num_cached_prompt_tokens == 8
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    assert bm.ref_counts[b.block_table[0]] == 1
    bm.free(b)
    assert bm.num_free_blocks == 16
    bm.check()


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(8))
    bm.allocate(a)
    finish_prefill(bm, a)  # registers blocks 0 and 1 (8 cached positions)
    b = seq(range(8))  # identical 8-token prompt: only the first block may be reused
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    c = seq(range(9))
    bm.allocate(c)
    assert c.num_cached_tokens == 8


def test_freed_blocks_keep_their_prefix_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9))
    bm.allocate(a)
    finish_prefill(bm, a)
    bm.free(a)
    b = seq(range(9))  # found again after a finished
    assert bm.allocate(b) and b.num_cached_tokens == 8
    bm.free(b)
    # unregistered blocks are handed out before cached ones
    c = seq(range(500, 504))
    bm.allocate(c)
    assert c.block_table[0] not in b.block_table[:2]
    bm.free(c)
    # filling the cache evicts the prefix; it is then not found
    d = seq(range(600, 616))
    assert bm.allocate(d)
    bm.free(d)
    e = seq(range(9))
    bm.allocate(e)
    assert e.num_cached_tokens == 0
    bm.check()


def test_hit_is_verified_against_the_token_ids():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(9))
    bm.allocate(a)
    finish_prefill(bm, a)
    # corrupt the stored key of block 0 as a digest collision would look
    b0 = a.block_table[0]
    parent, key = bm._key[b0]
    bm._key[b0] = (parent, (42,) + key[1:])
    b = seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_lookahead_keys_include_the_next_token():
    """With an MTP layer, a block's latents depend on the token after it: prompts that differ
    only right after a block boundary must not share that block."""
    bm = BlockManager(num_blocks=16, block_size=4, lookahead=1)
    a = seq([1, 2, 3, 4, 5, 6])
    bm.allocate(a)
    finish_prefill(bm, a)
    b = seq([1, 2, 3, 4, 9, 6])
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    c = seq([1, 2, 3, 4, 5, 8])
    bm.allocate(c)
    assert c.num_cached_tokens == 4


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(range(9))
    bm.allocate(a)
    finish_prefill(bm, a)
    b = seq(range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.cached_prefix_len(b.token_ids) == 0


def test_random_workload_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=4)
    live = []
    prefixes = [list(range(s, s + 12)) for s in (0, 100, 200)]
    for _ in range(500):
        if live and rng.random() < 0.45:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            tail = [rng.randrange(300, 400) for _ in range(rng.randint(0, 9))]
            s = seq(rng.choice(prefixes)[: rng.randint(1, 12)] + tail)
            if bm.allocate(s):
                finish_prefill(bm, s)
                for _ in range(rng.randint(0, 6)):
                    if not bm.grow(s, len(s)):
                        break
                    s.token_ids.append(rng.randrange(300, 400))
                    s.num_cached_tokens = len(s) - 1
                    bm.register(s)
                live.append(s)
        bm.check()
        held = sum(len(s.block_table) for s in live)
        assert sum(bm.ref_counts) == held
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == 40 and sum(bm.ref_counts) == 0
    bm.check()


def test_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
