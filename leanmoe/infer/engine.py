"""`LLM`: generation from any leanmoe / DeepseekV3 checkpoint, from Python.

    llm = LLM("runs/tiny")                                   # a run folder or an HF-layout folder
    outs = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=64))
    print(outs[0].text)
    for out in llm.stream("def fib(n):", SamplingParams(max_tokens=64)):
        print(out.delta_text, end="", flush=True)

One engine step = schedule (plain Python) -> run the model once (ModelRunner) -> append tokens,
check stop conditions, release text, return finished sequences' blocks. `step()` is public so a
server can drive the engine from its own thread (leanmoe.infer.async_engine).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanmoe.weights import from_pretrained, resolve_checkpoint
from leanmoe.infer.block_manager import BlockManager
from leanmoe.infer.config import EngineConfig
from leanmoe.infer.detokenizer import IncrementalDetokenizer
from leanmoe.infer.logprobs import TokenLogprob
from leanmoe.infer.model_runner import ModelRunner
from leanmoe.infer.sampling_params import SamplingParams
from leanmoe.infer.scheduler import Scheduler
from leanmoe.infer.sequence import Sequence
from leanmoe.model.transformer import Transformer

__all__ = ["LLM", "RequestOutput", "find_tokenizer"]

Prompt = str | list[int]


@dataclass
class RequestOutput:
    """A request's state after a step. `token_ids` / `text`: the output so far (for a streamed
    request, the text released so far); `delta_*`: what this step added. finish_reason: None
    while running, "stop", "length" or "abort". metrics (when finished), in seconds:
    time_to_first_token and latency from arrival, time_per_output_token after the first."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)
    # with SamplingParams.logprobs: one TokenLogprob per token of token_ids / delta_token_ids
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # with SamplingParams.prompt_logprobs


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """The tokenizer.json for a checkpoint: in the checkpoint folder, else in the run folder."""
    p = Path(path)
    ckpt = resolve_checkpoint(p)
    for folder in (ckpt, p, ckpt.parent.parent):
        if (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    return None


class LLM:
    """An inference engine over one model.

    model: a checkpoint folder (a training run folder -> its latest checkpoint, or an HF-layout
        folder), or a Transformer already in memory (its device and dtype are kept; it is put in
        eval mode).
    tokenizer: a leanmoe Tokenizer (or any object with encode / decode / eos_id), a path to a
        tokenizer.json, or None: found next to the checkpoint; without one, prompts are token ids.
    config / overrides: EngineConfig, or its fields as keyword arguments.

    Not thread-safe: one thread drives it (leanmoe.infer.async_engine serves many clients).
    """

    def __init__(self, model: str | os.PathLike | Transformer, tokenizer: Any = None,
                 config: EngineConfig | None = None, **overrides: Any):
        config = dataclasses.replace(config or EngineConfig())
        for k, v in overrides.items():
            if not hasattr(config, k):
                raise TypeError(f"LLM: unknown engine option {k!r}")
            setattr(config, k, v)
        if isinstance(model, Transformer):
            p = next(model.parameters())
            config.device, config.dtype = str(p.device), str(p.dtype).removeprefix("torch.")
            self.checkpoint: Path | None = None
        else:
            config.resolve_device()
            self.checkpoint = resolve_checkpoint(model)
            if tokenizer is None:
                tokenizer = find_tokenizer(model)
            model = from_pretrained(self.checkpoint, device=config.device, dtype=config.torch_dtype)
        if isinstance(tokenizer, (str, os.PathLike)):
            from leanmoe.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.model = model.eval()  # MoE layers count expert loads and add balance losses in train mode
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.config = config.resolved(model.config, has_mtp=len(model.mtp_layers) > 0)
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
        self.eos_token_id = tokenizer.eos_id if tokenizer is not None else model.config.eos_token_id
        self.runner = ModelRunner(model, self.config)
        self.runner.allocate_cache()
        spec = bool(self.config.speculative)
        self.block_manager = BlockManager(self.config.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching, lookahead=1 if spec else 0)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   decode_tokens=2 if spec else 1)
        self.num_steps = 0
        self.num_prompt_tokens = 0  # prompts of the requests that got their first token
        self.num_generated_tokens = 0

    # ------------------------------------------------------------------ requests
    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text needs a tokenizer); an empty text becomes [bos]."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
            if not ids and getattr(self.tokenizer, "bos_id", None) is not None:
                ids = [self.tokenizer.bos_id]
            return ids
        ids = list(prompt)
        if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise ValueError("a token-id prompt must be a list of integers")
        return ids

    def chat_stop_token_ids(self) -> list[int]:
        """Tokens that end an assistant turn besides eos (leanmoe's chat template: <|end|>)."""
        try:
            return [self.tokenizer.id_of("<|end|>")]
        except (AttributeError, KeyError):
            return []

    def make_sequence(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                      stream: bool = False) -> Sequence:
        """Validate and tokenise a request without touching the scheduler (safe from any thread).
        Raises ValueError for an empty or over-long prompt or ids outside the vocabulary."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                             "(prompt + at least one generated token)")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_token_id is not None:
            stop_ids.add(self.eos_token_id)
        seq = Sequence(ids, params, request_id, frozenset(stop_ids), self.runner.sampler.request_generator(params.seed))
        if (stream or params.stop) and self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
        return seq

    def add_sequence(self, seq: Sequence) -> str:
        self.scheduler.add(seq)
        return seq.request_id

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    stream: bool = False) -> str:
        """Queue a request; returns its id. stream=True releases text incrementally in step()."""
        return self.add_sequence(self.make_sequence(prompt, params, request_id, stream))

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its cache blocks. False if it is unknown or already done."""
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the outputs of the sequences it advanced."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        results = self.runner.run(batch)
        now = time.perf_counter()
        outputs, finished = [], []
        for seq, res in zip(batch.seqs, results):
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.num_prompt_tokens += seq.num_prompt_tokens
            if res.prompt_logprobs is not None:
                seq.prompt_logprobs = res.prompt_logprobs
            new = self._append(seq, res.tokens, res.logprobs)
            seq.draft = res.draft
            seq.num_cached_tokens = len(seq) - 1  # every position before the last token is in the cache
            self.block_manager.register(seq)
            if seq.finish_reason is not None:
                finished.append(seq)
            outputs.append(self._output(seq, new))
        self.scheduler.finish(finished)
        self.num_steps += 1
        return outputs

    def _append(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None) -> list[int]:
        params, detok = seq.params, seq.detokenizer
        new: list[int] = []
        if params.max_tokens == 0:  # the prompt was only to be computed (scored)
            seq.finish_reason = "length"
            return new
        for k, tok in enumerate(tokens):
            if tok in seq.stop_token_ids:
                seq.finish_reason = "stop"
                break
            seq.token_ids.append(tok)
            new.append(tok)
            if seq.logprobs is not None and logprobs is not None:
                seq.logprobs.append(logprobs[k])
            if detok is not None and detok.add(tok):
                seq.finish_reason = "stop"
                break
            if seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
                break
        self.num_generated_tokens += len(new)
        return new

    def _output(self, seq: Sequence, new: list[int]) -> RequestOutput:
        done = seq.finish_reason is not None
        detok = seq.detokenizer
        if detok is not None:
            if done:
                detok.finish()
            delta = detok.take(final=done)
            text = detok.text[: detok.emitted]
        elif done and self.tokenizer is not None:
            text = delta = self.tokenizer.decode(seq.output_token_ids,
                                                 skip_special_tokens=seq.params.skip_special_tokens)
        else:
            text = delta = ""
        metrics = {}
        if done:
            now = time.perf_counter()
            metrics = {"time_to_first_token": seq.first_token_time - seq.arrival_time,
                       "latency": now - seq.arrival_time}
            if seq.num_output_tokens > 1:
                metrics["time_per_output_token"] = (now - seq.first_token_time) / (seq.num_output_tokens - 1)
        lps = seq.logprobs
        return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.output_token_ids, text, new, delta, done,
                             seq.finish_reason, seq.num_cached_prompt_tokens, metrics,
                             None if lps is None else list(lps), None if lps is None else lps[len(lps) - len(new):],
                             seq.prompt_logprobs)

    # ------------------------------------------------------------------ convenience
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts (texts or token-id lists) to completion, batched; outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, plist)]  # validate all first
        for seq in seqs:
            self.add_sequence(seq)
        results: dict[str, RequestOutput] = {}
        try:
            while len(results) < len(seqs):
                for out in self.step():
                    if out.finished:
                        results[out.request_id] = out
        finally:
            for seq in seqs:
                if seq.request_id not in results:
                    self.abort(seq.request_id)
        return [results[s.request_id] for s in seqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding an output (with delta_text) each step it advances.
        Closing the iterator early aborts the request and frees its blocks."""
        rid = self.add_request(prompt, params, stream=True)
        done = False
        try:
            while not done:
                for out in self.step():
                    if out.request_id == rid:
                        done = out.finished
                        if out.delta_token_ids or out.delta_text or done:
                            yield out
        finally:
            if not done:
                self.abort(rid)

    def stats(self) -> dict[str, float]:
        """Counters: steps, tokens, speculative acceptance, prefix-cache hits, preemptions, blocks."""
        r, bm = self.runner, self.block_manager
        return {
            "steps": self.num_steps,
            "prompt_tokens": self.num_prompt_tokens,
            "generated_tokens": self.num_generated_tokens,
            "draft_tokens": r.num_draft_tokens,
            "accepted_draft_tokens": r.num_accepted_tokens,
            "acceptance_rate": r.num_accepted_tokens / r.num_draft_tokens if r.num_draft_tokens else float("nan"),
            "prefix_cache_hit_rate": bm.prefix_hit_tokens / bm.prefix_query_tokens if bm.prefix_query_tokens else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "aborted": self.scheduler.num_aborted,
            "free_blocks": bm.num_free_blocks,
            "total_blocks": bm.num_blocks,
            "cache_bytes_per_token": r.cache.bytes_per_token,
        }

    @property
    def acceptance_rate(self) -> float:
        """Share of MTP drafts the main model accepted (nan before any speculative step)."""
        return self.stats()["acceptance_rate"]
