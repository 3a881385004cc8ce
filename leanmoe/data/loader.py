"""Batches from token shards (leanmoe.data.shards builds them).

`TokenLoader` samples training windows as a pure function of (seed, step, rank): resuming at a
saved step replays exactly the batches the interrupted run would have drawn, and ranks draw
different windows without coordination. `eval_batches` walks validation in fixed order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from leanmoe.data.sources import DataError

__all__ = ["TokenLoader", "eval_batches"]


def _check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a flat array, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"the {split} split has {len(tokens):,} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                        "lower --seq-len or add data")


def _to_batch(buf: np.ndarray, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """buf [B, T+1] -> (input_ids [B, T], targets [B, T]) int64, on `device` if given."""
    t = torch.from_numpy(buf.astype(np.int64, copy=False))
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    if device is not None and torch.device(device).type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


class TokenLoader:
    """Random training windows: batch `step` of `rank` is a pure function of (seed, step, rank).

    tokens: flat token ids (a `ShardSet.train` memmap). Each batch is B windows of T + 1
    consecutive tokens at uniform random offsets, returned as (input_ids, targets) int64 [B, T],
    targets = input_ids shifted left by one. `next_batch` advances `step`; `state_dict` /
    `load_state_dict` carry it across a restart, so a resumed run draws exactly the batches the
    interrupted one would have.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, *, split: str = "train"):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        _check_length(tokens, seq_len, split)
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        self._offsets = np.arange(seq_len + 1)

    def batch_at(self, step: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step` (does not move `step`)."""
        rng = np.random.default_rng([self.seed, step, self.rank])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)  # last start: n - T - 1
        return _to_batch(self.tokens[starts[:, None] + self._offsets], device)

    def next_batch(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current step, then step += 1."""
        out = self.batch_at(self.step, device)
        self.step += 1
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position: {"step", "seed", "batch_size", "seq_len", "rank", "world_size"}."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state["step"]`. Warns when seed, batch_size or seq_len differ (the run then
        goes on, but no longer replays the batches of the one that saved the state)."""
        if "step" not in state:
            raise ValueError(f"loader state has no 'step' (keys: {sorted(state)})")
        changed = [f"{k} {state[k]} -> {getattr(self, k)}" for k in ("seed", "batch_size", "seq_len")
                   if k in state and state[k] != getattr(self, k)]
        if changed:
            warnings.warn(f"resuming the data loader with different settings ({', '.join(changed)}): batches will "
                          "differ from those the saved run would have drawn", stacklevel=2)
        self.step = int(state["step"])


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None, *,
                 rank: int = 0, world_size: int = 1, split: str = "val",
                 device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches in fixed order, the same on every call: (input_ids, targets) int64 [b, T].

    Window i is tokens[i*T : i*T + T + 1], so each token after the first is a target at most once
    (a tail shorter than T is left out); windows are grouped B at a time (the last batch may be
    smaller) and at most `max_batches` batches are made. With world_size > 1, rank r takes batches r, r + world_size, ... and every
    rank gets the same number of batches (the remainder is dropped) so collective ops stay in step.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    _check_length(tokens, seq_len, split)
    n_windows = (len(tokens) - 1) // seq_len
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    per_rank = n_batches // world_size
    if per_rank == 0:
        raise DataError(f"the {split} split ({len(tokens):,} tokens) makes {n_batches} batch(es) of {batch_size} x "
                        f"{seq_len}, fewer than the {world_size} ranks; lower --seq-len or the batch size, or add data")
    offsets = np.arange(seq_len + 1)
    for j in range(rank, per_rank * world_size, world_size):
        first = j * batch_size
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len
        yield _to_batch(np.asarray(tokens[starts[:, None] + offsets]), device)
