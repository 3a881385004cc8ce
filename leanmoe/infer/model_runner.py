"""The only device code of the engine: builds a step's tensors, runs the model, samples.

Shape legend: B sequences, T tokens per sequence, N packed prefill tokens, D hidden, V vocab.

Speculative decoding with the checkpoint's MTP module (DeepSeek-V3 section 2.2 and 5.4.3): MTP
module 1 combines the main model's hidden state at position i with the embedding of token i+1
and predicts token i+2. Each step therefore both verifies last step's draft and drafts the next:

    prefill   main([p_0 .. p_{n-1}])            -> h_0..h_{n-1}; sample t_n from h_{n-1}
              mtp(h_{0..n-1}, [p_1 .. p_{n-1}, t_n]) -> draft d_{n+1} from position n-1
    decode    main([t_n, d_{n+1}]) at n, n+1    -> g_{n+1}, g_{n+2}; accept d iff it is g_{n+1}
              mtp(h_{n, n+1}, [g_{n+1}, g_{n+2}]) -> next draft from position n+1 if accepted, else n

Both forwards write their latents at the same positions; on rejection position n+1 holds
latents of the rejected draft, which are past the sequence's valid length (never read: the
attention at n is causal) and are overwritten by the next step. One host sync per step brings
the tokens, acceptances and drafts back together.
"""

from __future__ import annotations

import torch

from leanmoe.infer.config import EngineConfig
from leanmoe.infer.paged_cache import DecodeMetadata, PagedAttention, PagedLatentCache, PrefillMetadata
from leanmoe.infer.sampler import Sampler
from leanmoe.infer.scheduler import ScheduledBatch
from leanmoe.infer.sequence import Sequence
from leanmoe.model.transformer import Transformer

__all__ = ["ModelRunner"]


class ModelRunner:
    """Holds the model, the paged cache (allocated in `allocate_cache`) and the sampler."""

    def __init__(self, model: Transformer, config: EngineConfig):
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.block_size = config.block_size
        self.speculative = bool(config.speculative)
        self.sampler = Sampler(self.device, config.seed)
        self.cache: PagedLatentCache | None = None
        self.backend: PagedAttention | None = None
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def allocate_cache(self) -> PagedLatentCache:
        self.cache = PagedLatentCache(self.model.config, self.config.num_blocks, self.block_size, self.device,
                                      self.config.torch_cache_dtype)
        self.backend = PagedAttention(self.cache)
        return self.cache

    # ------------------------------------------------------------------ inputs
    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _mtp_logits(self, h_prev: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor,
                    select: tuple) -> torch.Tensor:
        """MTP module 1 over h_prev [B, T, D] and next_ids [B, T]; its cache layer is written at
        the step's slots. Logits [*, V] only at the positions `select` indexes."""
        model = self.model
        layer = model.mtp_layers[0]
        cos, sin = model.model.rotary_emb(position_ids)
        h, _ = layer.forward_mtp(model.model.embed_tokens(next_ids), h_prev, cos, sin, self.backend)
        return model.lm_head(layer.shared_head.norm(h[select]))

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[tuple[list[int], int | None]]:
        """Run one scheduled step -> per sequence (new tokens, next draft or None)."""
        if batch.is_prefill:
            return self._prefill(batch.seqs)
        if self.speculative:
            return self._decode_speculative(batch.seqs)
        return self._decode(batch.seqs)

    def _prefill(self, seqs: list[Sequence]) -> list[tuple[list[int], int | None]]:
        ids: list[int] = []
        pos: list[int] = []
        slot_mapping: list[int] = []
        meta_seqs = []
        last: list[int] = []
        for seq in seqs:
            c, n = seq.num_cached_tokens, len(seq)
            start = len(ids)
            ids += seq.token_ids[c:n]
            pos += range(c, n)
            slots = [self._slot(seq, p) for p in range(n)]
            slot_mapping += slots[c:]
            meta_seqs.append((start, start + n - c, c, self._tensor(slots) if c else None))
            last.append(start + n - c - 1)
        self.backend.metadata = PrefillMetadata(self._tensor(slot_mapping), meta_seqs)
        input_ids = self._tensor(ids)[None]  # [1, N]
        position_ids = self._tensor(pos)[None]
        last_t = self._tensor(last)
        h, _ = self.model.hidden_states(input_ids, position_ids, self.backend)  # [1, N, D]
        logits = self.model.lm_head(h[0, last_t])  # [S, V]
        params = [s.params for s in seqs]
        tokens = self.sampler.sample(logits, params, [s.generator for s in seqs])
        if not self.speculative:
            return [([t], None) for t in tokens.tolist()]  # host sync: the sampled tokens
        next_ids = torch.roll(input_ids, -1, dims=1)  # token i+1 next to position i ...
        next_ids[0, last_t] = tokens  # ... the sampled token after each prompt
        drafts = self._mtp_logits(h, next_ids, position_ids, (0, last_t)).argmax(dim=-1)
        out = torch.stack([tokens, drafts]).tolist()  # host sync: tokens and drafts
        return [([t], d) for t, d in zip(out[0], out[1])]

    def _decode_metadata(self, seqs: list[Sequence], t: int) -> DecodeMetadata:
        width = max(len(s.block_table) for s in seqs)
        table = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        slots = [self._slot(s, s.num_cached_tokens + i) for s in seqs for i in range(t)]
        return DecodeMetadata(self._tensor(slots), self._tensor(table, torch.int32),
                              self._tensor([s.num_cached_tokens + t for s in seqs], torch.int32))

    def _decode(self, seqs: list[Sequence]) -> list[tuple[list[int], int | None]]:
        self.backend.metadata = self._decode_metadata(seqs, 1)
        input_ids = self._tensor([[s.token_ids[-1]] for s in seqs])  # [B, 1]
        position_ids = self._tensor([[s.num_cached_tokens] for s in seqs])
        h, _ = self.model.hidden_states(input_ids, position_ids, self.backend)
        logits = self.model.lm_head(h[:, -1])  # [B, V]
        tokens = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return [([t], None) for t in tokens.tolist()]  # host sync: the sampled tokens

    def _decode_speculative(self, seqs: list[Sequence]) -> list[tuple[list[int], int | None]]:
        self.backend.metadata = self._decode_metadata(seqs, 2)
        drafts = self._tensor([s.draft for s in seqs])  # [B]
        input_ids = torch.stack([self._tensor([s.token_ids[-1] for s in seqs]), drafts], dim=1)  # [B, 2]
        n = self._tensor([s.num_cached_tokens for s in seqs])
        position_ids = torch.stack([n, n + 1], dim=1)
        h, _ = self.model.hidden_states(input_ids, position_ids, self.backend)  # [B, 2, D]
        logits = self.model.lm_head(h)  # [B, 2, V]
        first, second, accepted = self.sampler.verify(logits, drafts, [s.params for s in seqs],
                                                      [s.generator for s in seqs])
        rows = torch.arange(len(seqs), device=self.device)
        next_drafts = self._mtp_logits(h, torch.stack([first, second], dim=1), position_ids,
                                       (rows, accepted.long())).argmax(dim=-1)
        out = torch.stack([first, second, accepted.long(), next_drafts]).tolist()  # host sync: one per step
        self.num_draft_tokens += len(seqs)
        self.num_accepted_tokens += sum(out[2])
        return [([a, b] if ok else [a], d) for a, b, ok, d in zip(*out)]
