"""Cache-block bookkeeping: allocation, reference counts, prefix sharing. Plain Python, no torch.

The paged cache is `num_blocks` blocks of `block_size` token slots; a sequence owns a list of
block ids (its block table), position p living in slot p % block_size of block table[p // block_size].

Prefix sharing: once every slot of a block holds final latents, the block is registered under a
digest chained over the token ids: digest_k = blake2b(digest_{k-1} || tokens of block k). A new
request walks its prompt block by block and reuses a registered block when the digest matches
*and* the stored (parent digest, token ids) are equal (verified on hit, so a digest collision can
never hand out wrong latents). Shared blocks are reference counted and never written again: a
sequence only writes positions >= its cached length. A block whose count drops to 0 keeps its
contents and digest in the free list until it is handed out again, so a finished request's prefix
is still found by the next one (the least recently freed blocks are reused first).

`lookahead` extra tokens are added to each block's key when the cache's contents depend on
tokens after the block: an MTP layer's latent at position i is computed from token i + 1.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from leanmoe.infer.sequence import Sequence

__all__ = ["BlockManager"]


def _chain(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Owns which cache block belongs to whom. Sequences carry `block_table` and `block_digests`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, lookahead: int = 0):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.lookahead = lookahead
        self.ref_counts = [0] * num_blocks
        self._digest: list[bytes | None] = [None] * num_blocks
        self._key: list[tuple[bytes, tuple[int, ...]] | None] = [None] * num_blocks
        self._by_digest: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_query_tokens = 0  # prompt tokens looked up
        self.prefix_hit_tokens = 0    # of which found in the cache

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (some may still hold reusable prefix latents)."""
        return len(self._free)

    def blocks_needed(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def _block_key(self, token_ids: list[int], k: int) -> tuple[int, ...]:
        return tuple(token_ids[k * self.block_size: (k + 1) * self.block_size + self.lookahead])

    def _match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """Registered blocks equal to the leading blocks of `token_ids` (at least one token is
        always left to compute: its logits start the generation)."""
        blocks: list[int] = []
        digests: list[bytes] = []
        parent = b""
        n = len(token_ids)
        k = 0
        while (k + 1) * self.block_size + self.lookahead <= n and (k + 1) * self.block_size <= n - 1:
            key = self._block_key(token_ids, k)
            digest = _chain(parent, key)
            b = self._by_digest.get(digest)
            if b is None or self._key[b] != (parent, key):  # verify on hit
                break
            blocks.append(b)
            digests.append(digest)
            parent = digest
            k += 1
        return blocks, digests

    def cached_prefix_len(self, token_ids: list[int]) -> int:
        """Leading tokens of `token_ids` that `allocate` would find in the cache (read-only)."""
        if not self.enable_prefix_caching:
            return 0
        return len(self._match_prefix(token_ids)[0]) * self.block_size

    # ------------------------------------------------------------------ allocation
    def _take(self) -> int:
        b, _ = self._free.popitem(last=False)
        digest = self._digest[b]
        if digest is not None:  # evict its cached prefix
            if self._by_digest.get(digest) == b:
                del self._by_digest[digest]
            self._digest[b] = self._key[b] = None
        self.ref_counts[b] = 1
        return b

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.
        Sets block_table and num_cached_tokens. False (and no change) if blocks run short.
        A sequence that needs its prompt's logprobs reuses nothing (every position is computed)."""
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        needed = self.blocks_needed(len(seq))
        lookup = self.enable_prefix_caching and not seq.needs_prompt_logprobs
        hits, digests = self._match_prefix(seq.token_ids) if lookup else ([], [])
        hits_in_free_list = sum(1 for b in hits if self.ref_counts[b] == 0)
        if needed - len(hits) + hits_in_free_list > len(self._free):
            return False
        for b in hits:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1
        seq.block_table = hits + [self._take() for _ in range(needed - len(hits))]
        seq.block_digests = digests
        seq.num_cached_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = seq.num_cached_tokens
        if lookup:
            self.prefix_query_tokens += len(seq)
            self.prefix_hit_tokens += seq.num_cached_tokens
        return True

    def can_grow(self, seq: Sequence, num_positions: int) -> bool:
        return self.blocks_needed(num_positions) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, num_positions: int) -> bool:
        """Make seq's block table cover positions [0, num_positions). False (no change) if short."""
        extra = self.blocks_needed(num_positions) - len(seq.block_table)
        if extra > len(self._free):
            return False
        for _ in range(extra):
            seq.block_table.append(self._take())
        return True

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks (finished, aborted or preempted). Blocks that hold a
        registered prefix go to the back of the free list, the others to the front."""
        for b in reversed(seq.block_table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            if self.ref_counts[b] == 0:
                self._free[b] = None
                if self._digest[b] is None:
                    self._free.move_to_end(b, last=False)
        seq.block_table = []
        seq.block_digests = []
        seq.num_cached_tokens = 0

    # ------------------------------------------------------------------ prefix registration
    def register(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became final (all slots hold latents whose inputs,
        including `lookahead` tokens past the block, are known). Call after each step."""
        if not self.enable_prefix_caching:
            return
        digests = seq.block_digests
        bs = self.block_size
        k = len(digests)
        while (k + 1) * bs <= seq.num_cached_tokens and (k + 1) * bs + self.lookahead <= len(seq):
            parent = digests[-1] if digests else b""
            key = self._block_key(seq.token_ids, k)
            digest = _chain(parent, key)
            b = seq.block_table[k]
            if digest not in self._by_digest and self._digest[b] is None:
                self._by_digest[digest] = b
                self._digest[b] = digest
                self._key[b] = (parent, key)
            digests.append(digest)
            k += 1

    def check(self) -> None:
        """Assert internal consistency (tests): free list == blocks with count 0, digests agree."""
        zero = {b for b, c in enumerate(self.ref_counts) if c == 0}
        assert zero == set(self._free), (sorted(zero ^ set(self._free)))
        assert all(c >= 0 for c in self.ref_counts)
        for digest, b in self._by_digest.items():
            assert self._digest[b] == digest
