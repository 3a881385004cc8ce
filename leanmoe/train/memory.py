"""How much memory a training step needs, how much the device has, and the largest micro-batch
that fits: the memory side of what a run costs (leanmoe.train.cost is the time and money side).

The estimate is deliberately generous, so a default that passes it does not run out of memory;
it was calibrated against the peak GPU memory the training report records. `retain_cpu_heap` is
the CPU allocator setting the trainer applies (freed memory kept for reuse)."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

import torch

from leanmoe.config import ModelConfig

__all__ = ["estimate_step_memory", "available_memory", "largest_fitting_micro_batch", "retain_cpu_heap"]

HEADROOM = 0.9  # plan for at most this share of the free memory


def estimate_step_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, act_bytes: int = 4,
                         world_size: int = 1) -> int:
    """Peak bytes for one micro-batch: weights, gradients and two AdamW moments in fp32 (sharded
    over `world_size` ranks), plus the activations autograd keeps per token and layer (attention
    projections and expanded heads, routed copies of each token, the vocabulary logits)."""
    n = cfg.num_params()
    params = n.total + n.mtp
    d, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.moe_intermediate_size
    k = cfg.num_experts_per_tok
    per_layer = (6 * d + 4 * h * cfg.qk_head_dim + 2 * h * cfg.v_head_dim + 3 * cfg.latent_dim
                 + max(3 * cfg.intermediate_size, k * (3 * d + 4 * f) + 4 * f * cfg.n_shared_experts))
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per_token = layers * per_layer + 4 * cfg.vocab_size * (1 + cfg.num_nextn_predict_layers)
    return int(16 * params / world_size + 1.5 * micro_batch * seq_len * per_token * act_bytes)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this run on the device: the GPU's free memory, or MemAvailable of the host
    (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def largest_fitting_micro_batch(cfg: ModelConfig, per_rank_batch: int, below: int, seq_len: int, free: int,
                                world_size: int = 1) -> int | None:
    """The largest micro-batch smaller than `below` that divides `per_rank_batch` and fits in
    HEADROOM x `free` bytes (None if none does)."""
    fits = [d for d in range(1, below) if per_rank_batch % d == 0
            and estimate_step_memory(cfg, d, seq_len, world_size=world_size) <= HEADROOM * free]
    return max(fits) if fits else None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# NOTE: by default glibc serves each block above an adaptive threshold (at most 32 MB) with a fresh
# mmap, and hands the top of its heap back to the kernel once enough of it is free. A training step
# frees and re-allocates the same large activations every step, so they come back as fresh pages
# the kernel must fault in and zero: ~150,000 page faults a step for `tiny` in bf16 on the CPU (16 x
# 256 tokens). Kept, they are reused, and the faults stop after the first steps (bench/cpu_heap.py,
# docs/benchmarks.md).
_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def retain_cpu_heap() -> str:
    """Keep memory the process frees for reuse instead of returning it to the kernel (glibc's
    `mallopt`: no mmap for large blocks, no trimming of the heap), so a training loop on the CPU
    stops paying page faults for the same activations every step. The process then holds its
    peak memory until it exits, as a GPU caching allocator does.

    Leaves the allocator alone where the user chose one (LD_PRELOAD, one of _ALLOCATOR_SETTINGS or a
    glibc.malloc tunable set), where LEANMOE_CPU_HEAP=system, and off glibc. Returns what it did, in words."""
    choice = os.environ.get("LEANMOE_CPU_HEAP", "retain")
    if choice not in ("retain", "system"):
        raise ValueError(f"LEANMOE_CPU_HEAP={choice!r}: expected 'retain' (the default) or 'system'")
    if choice == "system":
        return "system allocator (LEANMOE_CPU_HEAP=system)"
    chosen = [k for k in _ALLOCATOR_SETTINGS if k in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if os.environ.get("LD_PRELOAD"):
        chosen.append("LD_PRELOAD")
    if chosen:
        return f"allocator left as set ({', '.join(chosen)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "system allocator (not glibc)"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
        return "system allocator (mallopt refused)"
    return "freed memory kept for reuse"
