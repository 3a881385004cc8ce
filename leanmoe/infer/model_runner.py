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
the tokens, acceptances and drafts back together (a second one brings logprobs, when a request
of the batch asks for them).

Penalties count the output tokens before the position predicted: at the verify step's second
position that includes the draft, which is the first token whenever the second one is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from leanmoe.infer.config import EngineConfig
from leanmoe.infer.logprobs import TokenLogprob
from leanmoe.infer.paged_cache import DecodeMetadata, PagedAttention, PagedLatentCache, PrefillMetadata
from leanmoe.infer.sampler import Sampler
from leanmoe.infer.scheduler import ScheduledBatch
from leanmoe.infer.scoring import logprob_rows
from leanmoe.infer.sequence import Sequence
from leanmoe.model.transformer import Transformer

__all__ = ["ModelRunner", "StepOutput"]

PROMPT_LOGPROB_CHUNK = 2**26  # logits computed at once for prompt logprobs (fp32 values: 256 MiB)


@dataclass
class StepOutput:
    """What one step produced for one sequence: new tokens (1, or 2 with an accepted draft), the
    next draft (speculative decoding), and the logprobs the request asked for."""

    tokens: list[int]
    draft: int | None = None
    logprobs: list[TokenLogprob] | None = None         # one per token
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token (the first: None)


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
        self._compiled_hidden = None  # torch.compile of _hidden, once compile_decode has run
        self._compile_failed = False
        self._warmed = False  # both graphs compiled by compile_decode(warmup=True)
        self.compile_status = "eager" if not config.compile_decode else "compiled at the first decode step"

    def allocate_cache(self) -> PagedLatentCache:
        self.cache = PagedLatentCache(self.model.config, self.config.num_blocks, self.block_size, self.device,
                                      self.config.torch_cache_dtype)
        self.backend = PagedAttention(self.cache)
        return self.cache

    # ------------------------------------------------------------------ the compiled decode forward
    def _hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The trunk over [B, T] ids with the backend's current metadata -> final-normed h [B, T, D]."""
        return self.model.hidden_states(input_ids, position_ids, self.backend)[0]

    def compile_decode(self, warmup: bool = False) -> str:
        """Compile the decode forward with torch.compile (dynamic shapes: one graph for batch 1 and
        one for larger batches, each compiled when first met). warmup: compile both now, over dummy
        steps that write block 0 of the cache -- only while no sequence holds blocks (a server at
        startup, so that no request waits for a compile). Returns `compile_status`. A failed compile
        raises under compile="on"; otherwise decoding stays eager and the status says why."""
        import leanmoe.kernels.mla_decode  # noqa: F401  (registers leanmoe::mla_decode before tracing)

        if self._compiled_hidden is None:
            self._compiled_hidden = torch.compile(self._hidden, dynamic=True)
            self.compile_status = "compiled (torch.compile)"
        if warmup:
            t0 = time.perf_counter()
            try:
                self._warm(self._compiled_hidden)
            except torch._dynamo.exc.TorchDynamoException as e:  # no C++ compiler, a lowering bug, ...
                self._compile_failed_with(e)
            else:
                self._warmed = True
                self.compile_status = f"compiled (torch.compile; warm-up {time.perf_counter() - t0:.0f} s)"
        return self.compile_status

    def _compile_failed_with(self, e: Exception) -> None:
        if self.config.compile == "on":
            raise RuntimeError(f"compile='on': compiling the decode step failed: {_first_line(e)}") from e
        self._compiled_hidden, self._compile_failed = None, True
        self.compile_status = f"eager (torch.compile failed: {_first_line(e)})"

    @torch.inference_mode()
    def _warm(self, fn) -> None:
        t = 2 if self.speculative else 1
        try:
            for b in (1, 2):
                self.backend.metadata = DecodeMetadata(
                    torch.arange(b * t, device=self.device), torch.zeros(b, 2, dtype=torch.int32, device=self.device),
                    torch.full((b,), t, dtype=torch.int32, device=self.device))
                fn(torch.zeros(b, t, dtype=torch.int64, device=self.device),  # contiguous, as a step's: strides
                   torch.arange(t, device=self.device).repeat(b, 1))         # are guarded too
        finally:
            self.backend.metadata = None

    @property
    def _compiling(self) -> bool:
        return self.config.compile_decode and not self._compile_failed

    def _decode_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """_hidden for a decode step: compiled when the config says so."""
        if not self._compiling:
            return self._hidden(input_ids, position_ids)
        if self._compiled_hidden is None:
            self.compile_decode()
        try:
            if self._warmed:
                # NOTE: dynamo's guards check every parameter, cache view and metadata tensor on each
                # call (0.2-0.5 ms a step here). Once both graphs exist, only the guards that tell
                # them apart (batch 1 or more) are needed: nothing else of the model, the cache or
                # the step's tensors (dtypes, devices, ranks) changes while the engine lives.
                try:
                    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                        return self._compiled_hidden(input_ids, position_ids)
                except RuntimeError as e:  # a step no warm-up graph fits: compile it, with every guard
                    if "skip_guard_eval_unsafe" not in str(e):
                        raise
            return self._compiled_hidden(input_ids, position_ids)
        except torch._dynamo.exc.TorchDynamoException as e:  # compiling at a new shape failed (errors
            self._compile_failed_with(e)                      # of the compiled code pass unwrapped)
            return self._hidden(input_ids, position_ids)

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

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits_BV: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, list | None]:
        """Adjusted logits -> tokens [B] on the device, and per row its TokenLogprob (or None)."""
        params = [s.params for s in seqs]
        if any(p.adjusts_logits for p in params):
            logits_BV = self.sampler.adjust(logits_BV, params, [s.output_token_ids for s in seqs])
        tokens_B = self.sampler.sample(logits_BV, params, [s.generator for s in seqs])
        return tokens_B, self._logprobs(logits_BV, params, tokens_B)

    def _logprobs(self, logits_BV: torch.Tensor, params: list, tokens_B: torch.Tensor) -> list | None:
        """Per row, the TokenLogprob of its token (None where the request did not ask)."""
        wanted = [p.logprobs for p in params]
        if all(n is None for n in wanted):
            return None
        chosen_B, top_BN, ids_BN = self.sampler.logprobs(logits_BV, params, tokens_B, max(n or 0 for n in wanted))
        chosen, tops, ids = chosen_B.tolist(), top_BN.tolist(), ids_BN.tolist()  # host sync: only with logprobs
        tok = tokens_B.tolist()
        return [None if n is None else
                TokenLogprob(tok[b], chosen[b], [(i, v) for i, v in zip(ids[b][:n], tops[b][:n]) if v != float("-inf")])
                for b, n in enumerate(wanted)]

    def _prompt_logprobs(self, h_ND: torch.Tensor, seq: Sequence, start: int) -> list[TokenLogprob]:
        """Raw log p(prompt token i | tokens before it) from the prefill's hidden states of `seq`
        (packed at rows start .. start + len - 1 of h_ND; every position was computed)."""
        assert seq.num_cached_tokens == 0, "prompt logprobs need the whole prompt computed"
        ids, n, top_n = seq.prompt_token_ids, seq.num_prompt_tokens, seq.params.prompt_logprobs
        out = [TokenLogprob(ids[0], None, [])]
        chunk = max(1, PROMPT_LOGPROB_CHUNK // self.model.config.vocab_size)
        for lo in range(0, n - 1, chunk):  # row lo predicts prompt token lo + 1
            hi = min(n - 1, lo + chunk)
            logp_CV = self.model.lm_head(h_ND[start + lo: start + hi]).float().log_softmax(dim=-1)
            out += logprob_rows(logp_CV, ids[lo + 1: hi + 1], top_n)  # host sync: only with prompt logprobs
        return out

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[StepOutput]:
        """Run one scheduled step -> per sequence what it produced."""
        if batch.is_prefill:
            return self._prefill(batch.seqs)
        if self.speculative:
            return self._decode_speculative(batch.seqs)
        return self._decode(batch.seqs)

    def _prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        ids: list[int] = []
        pos: list[int] = []
        slot_mapping: list[int] = []
        meta_seqs = []
        last: list[int] = []
        starts: list[int] = []
        for seq in seqs:
            c, n = seq.num_cached_tokens, len(seq)
            start = len(ids)
            starts.append(start)
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
        tokens, logprobs = self._sample(logits, seqs)
        outs = [StepOutput([], None, _one(logprobs, b)) for b in range(len(seqs))]
        for b, seq in enumerate(seqs):
            if seq.needs_prompt_logprobs:
                outs[b].prompt_logprobs = self._prompt_logprobs(h[0], seq, starts[b])
        if not self.speculative:
            rows = [[t] for t in tokens.tolist()]  # host sync: the sampled tokens
            drafts = [None] * len(seqs)
        else:
            next_ids = torch.roll(input_ids, -1, dims=1)  # token i+1 next to position i ...
            next_ids[0, last_t] = tokens  # ... the sampled token after each prompt
            drafts_t = self._mtp_logits(h, next_ids, position_ids, (0, last_t)).argmax(dim=-1)
            both = torch.stack([tokens, drafts_t]).tolist()  # host sync: tokens and drafts
            rows, drafts = [[t] for t in both[0]], both[1]
        for o, r, d in zip(outs, rows, drafts):
            o.tokens, o.draft = r, d
        return outs

    def _decode_metadata(self, seqs: list[Sequence], t: int) -> DecodeMetadata:
        width = max(len(s.block_table) for s in seqs)
        if self._compiling:  # a width of 1 would be a graph of its own (dynamo specialises sizes 0 and 1)
            width = max(width, 2)
        table = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        slots = [self._slot(s, s.num_cached_tokens + i) for s in seqs for i in range(t)]
        return DecodeMetadata(self._tensor(slots), self._tensor(table, torch.int32),
                              self._tensor([s.num_cached_tokens + t for s in seqs], torch.int32))

    def _decode(self, seqs: list[Sequence]) -> list[StepOutput]:
        self.backend.metadata = self._decode_metadata(seqs, 1)
        input_ids = self._tensor([[s.token_ids[-1]] for s in seqs])  # [B, 1]
        position_ids = self._tensor([[s.num_cached_tokens] for s in seqs])
        h = self._decode_hidden(input_ids, position_ids)
        logits = self.model.lm_head(h[:, -1])  # [B, V]
        tokens, logprobs = self._sample(logits, seqs)
        return [StepOutput([t], None, _one(logprobs, b))
                for b, t in enumerate(tokens.tolist())]  # host sync: the sampled tokens

    def _decode_speculative(self, seqs: list[Sequence]) -> list[StepOutput]:
        self.backend.metadata = self._decode_metadata(seqs, 2)
        drafts = self._tensor([s.draft for s in seqs])  # [B]
        input_ids = torch.stack([self._tensor([s.token_ids[-1] for s in seqs]), drafts], dim=1)  # [B, 2]
        n = self._tensor([s.num_cached_tokens for s in seqs])
        position_ids = torch.stack([n, n + 1], dim=1)
        h = self._decode_hidden(input_ids, position_ids)  # [B, 2, D]
        logits = self.model.lm_head(h)  # [B, 2, V]
        params = [s.params for s in seqs]
        adjust = any(p.adjusts_logits for p in params)
        want_logprobs = any(p.logprobs is not None for p in params)
        per_row = [p for p in params for _ in range(2)] if adjust or want_logprobs else []  # of [B * 2, V]
        if adjust:  # the second position predicts the token after the draft: its counts include it
            outputs = [o for s in seqs for o in (s.output_token_ids, s.output_token_ids + [s.draft])]
            logits = self.sampler.adjust(logits.flatten(0, 1), per_row, outputs).view(logits.shape)
        first, second, accepted = self.sampler.verify(logits, drafts, params, [s.generator for s in seqs])
        rows = torch.arange(len(seqs), device=self.device)
        next_drafts = self._mtp_logits(h, torch.stack([first, second], dim=1), position_ids,
                                       (rows, accepted.long())).argmax(dim=-1)
        out = torch.stack([first, second, accepted.long(), next_drafts]).tolist()  # host sync: one per step
        self.num_draft_tokens += len(seqs)
        self.num_accepted_tokens += sum(out[2])
        lps = None
        if want_logprobs:
            lps = self._logprobs(logits.flatten(0, 1), per_row, torch.stack([first, second], dim=1).flatten())
        return [StepOutput([a, b] if ok else [a], d,
                           None if lps is None or lps[2 * i] is None else lps[2 * i: 2 * i + 1 + ok])
                for i, (a, b, ok, d) in enumerate(zip(*out))]


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _one(logprobs: list | None, b: int) -> list[TokenLogprob] | None:
    """Row b's single-token logprobs list, or None where it did not ask."""
    return None if logprobs is None or logprobs[b] is None else [logprobs[b]]
