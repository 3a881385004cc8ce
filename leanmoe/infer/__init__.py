"""Inference: paged latent cache, continuous batching, MTP speculative decoding, OpenAI server.

One job per file: `sequence` (a request's state), `block_manager` and `scheduler` (plain Python),
`paged_cache` (the cache tensors and attention backend), `model_runner` (the only device code),
`sampler`, `detokenizer`, `engine` (`LLM`), `async_engine` (the engine on a background thread),
`server` (OpenAI-compatible HTTP), `commands` (the `generate`, `chat`, `serve` CLI commands).
"""

from leanmoe.infer.config import EngineConfig
from leanmoe.infer.engine import LLM, RequestOutput
from leanmoe.infer.sampler import SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput"]
