"""Inference: paged latent cache, continuous batching, MTP speculative decoding, OpenAI server.

One job per file: `sampling_params` and `sequence` (a request's parameters and state),
`block_manager` and `scheduler` -- these four plain Python: neither they nor what they import
(`logprobs`: token log-probabilities and their OpenAI shapes) need torch
(tests/infer/test_scheduler.py runs them with torch blocked) --
`paged_cache` (the cache tensors and attention backend), `model_runner` (the only device code),
`sampler`, `detokenizer`, `engine` (`LLM`), `async_engine` (the engine on a background thread),
`protocol` and `responses` (OpenAI request and response bodies), `limits` (what a request may
cost the server, checked before the work), `server` (OpenAI-compatible HTTP), `routes` (/metrics,
/openapi.json, vLLM's tokenizer routes), `metrics` (Prometheus, vLLM's names), `scoring` (token
log-probabilities from a full forward pass), `harness` (lm-evaluation-harness), `commands` (the
`generate`, `chat`, `serve` CLI commands).
"""

from leanmoe.infer.config import EngineConfig
from leanmoe.infer.engine import LLM, RequestOutput
from leanmoe.infer.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput"]
