"""Serving configuration: one small dataclass, resolved against the model it serves."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from leanmoe.config import ModelConfig
from leanmoe.device import auto_dtype, dtype_name, resolve_device, torch_dtype

__all__ = ["EngineConfig"]


@dataclass
class EngineConfig:
    """How the inference engine runs a model.

    block_size: tokens per paged-cache block.
    num_blocks: cache blocks to allocate; None sizes the cache to hold `max_num_seqs` sequences of
        `max_model_len` tokens, capped by `max_cache_bytes`.
    max_num_seqs: most sequences in the running batch.
    max_num_batched_tokens: token budget of one step (prompt tokens of a prefill step; 1 or 2 per
        sequence in a decode step). At least `max_model_len`, so any admissible prompt fits a step.
    max_model_len: longest sequence (prompt + output); None = the model's max_position_embeddings,
        or less when one sequence's cache would not fit in `max_cache_bytes`.
    enable_prefix_caching: share full cache blocks between requests with the same prompt prefix.
    speculative: draft with the checkpoint's first MTP module and verify in the next step
        (`None`: whenever the model has one).
    device / dtype: names as in training (leanmoe.device): "auto" picks cuda + bf16 when a GPU is
        there (else mps or cpu, + fp32); fp32 | bf16 | fp16 (or float32 | bfloat16 | float16).
    dtype / cache_dtype: weights and cache; cache_dtype None follows dtype.
    compile: run decode steps through `torch.compile` (inductor, dynamic shapes): "on", "off", or
        "auto", which is "on" for fp32 on a CPU (decode steps took 0.68x the eager ones at batch 1
        and 0.89x at batch 16 there: docs/benchmarks.md) unless LEANMOE_COMPILE=0, and "off"
        elsewhere (not measured). The first decode step compiles (15-30 s on a 2-core CPU; inductor
        caches its work on disk for the next start), or `ModelRunner.compile_decode(warmup=True)`.
        Under "auto" a failed compile falls back to eager and `ModelRunner.compile_status` says why.
    """

    block_size: int = 64
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    speculative: bool | None = None
    device: str = "auto"  # auto: cuda when available, else mps, else cpu
    dtype: str = "auto"  # auto: bf16 on a GPU, fp32 elsewhere
    cache_dtype: str | None = None
    max_cache_bytes: int = 2 * 2**30
    seed: int = 0
    compile: str = "auto"

    def resolved(self, cfg: ModelConfig, has_mtp: bool) -> EngineConfig:
        """A copy with every None filled in from the model, validated; raises ValueError naming the field."""
        c = dataclasses.replace(self)
        c.resolve_device()
        if c.block_size <= 0:
            raise ValueError(f"EngineConfig: block_size must be positive, got {c.block_size}")
        if c.max_num_seqs <= 0:
            raise ValueError(f"EngineConfig: max_num_seqs must be positive, got {c.max_num_seqs}")
        if c.cache_dtype == "auto":
            c.cache_dtype = None  # follows the weights
        for name in ("dtype", "cache_dtype"):
            v = getattr(c, name)
            if v is not None:
                try:
                    setattr(c, name, dtype_name(v))
                except ValueError as e:
                    raise ValueError(f"EngineConfig: {name}={v!r}; {str(e).split(': ', 1)[1]}") from None
        if c.cache_dtype is None:
            c.cache_dtype = c.dtype
        if c.compile not in ("auto", "on", "off"):
            raise ValueError(f"EngineConfig: compile={c.compile!r}; choose one of auto, on, off")
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        elem = torch.empty(0, dtype=torch_dtype(c.cache_dtype)).element_size()
        block_bytes = n_layers * c.block_size * cfg.latent_dim * elem
        if c.max_model_len is None:
            # the model's context, but no longer than one sequence's cache fits in max_cache_bytes
            fits = max(1, c.max_cache_bytes // block_bytes) * c.block_size
            c.max_model_len = max(2, min(cfg.max_position_embeddings, fits))
        if not 2 <= c.max_model_len <= cfg.max_position_embeddings:
            raise ValueError(f"EngineConfig: max_model_len={c.max_model_len} must be in [2, max_position_embeddings="
                             f"{cfg.max_position_embeddings}]")
        if c.max_num_batched_tokens is None:
            c.max_num_batched_tokens = max(c.max_model_len, 2048)
        if c.max_num_batched_tokens < c.max_model_len:
            raise ValueError(f"EngineConfig: max_num_batched_tokens={c.max_num_batched_tokens} must be >= "
                             f"max_model_len={c.max_model_len} (a prompt is prefilled in one step)")
        if c.speculative is None:
            c.speculative = has_mtp
        if c.speculative and not has_mtp:
            raise ValueError("EngineConfig: speculative=True needs a model with MTP modules "
                             "(num_nextn_predict_layers > 0)")
        blocks_per_seq = -(-c.max_model_len // c.block_size)
        if c.num_blocks is None:
            c.num_blocks = max(blocks_per_seq, min(c.max_num_seqs * blocks_per_seq, c.max_cache_bytes // block_bytes))
        if c.num_blocks < blocks_per_seq:
            raise ValueError(f"EngineConfig: num_blocks={c.num_blocks} cannot hold one sequence of max_model_len="
                             f"{c.max_model_len} ({blocks_per_seq} blocks of {c.block_size})")
        return c

    def resolve_device(self) -> None:
        """Replace "auto" device/dtype by concrete ones (in place); ValueError for a device that is
        not there."""
        self.device = str(resolve_device(self.device))
        if self.dtype == "auto":
            self.dtype = auto_dtype(self.device)

    @property
    def compile_decode(self) -> bool:
        """Whether decode steps should be compiled (see `compile`; needs resolved device and dtype)."""
        if self.compile == "auto":
            return (torch.device(self.device).type == "cpu" and self.torch_dtype == torch.float32
                    and os.environ.get("LEANMOE_COMPILE", "1") != "0")
        return self.compile == "on"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def torch_cache_dtype(self) -> torch.dtype:
        return torch_dtype(self.cache_dtype or self.dtype)
