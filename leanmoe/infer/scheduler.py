"""Continuous batching: which sequences run in the next step. Plain Python, no torch.

Each step is either a prefill step (waiting requests join: all their uncached prompt tokens in
one forward, within a token budget) or a decode step (every running sequence advances by one
token, or by a verified draft and one more with speculative decoding). Requests join whenever a
prefill step has room and leave as soon as they finish, so the running batch changes every step.

When the cache runs out of blocks in a decode step, the most recently admitted sequence is
preempted: its blocks are returned and it goes back to the front of the queue, to be recomputed
from its tokens (prompt + output so far) when blocks free up. Recompute is cheap here because
the prefix cache usually still holds its leading blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from leanmoe.infer.block_manager import BlockManager
from leanmoe.infer.sequence import Sequence, SequenceStatus

__all__ = ["Scheduler", "ScheduledBatch"]


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    num_tokens: int  # tokens computed by the main model in this step


class Scheduler:
    """decode_tokens: positions each running sequence writes per decode step (2 with a draft)."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 decode_tokens: int = 1):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.decode_tokens = decode_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_aborted = 0

    def add(self, seq: Sequence) -> None:
        if len(seq) > self.max_num_batched_tokens:
            raise ValueError(f"prompt of {len(seq)} tokens exceeds the step budget of {self.max_num_batched_tokens}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when nothing is queued."""
        batch = self._schedule_prefill()
        if batch is None and self.running:
            batch = self._schedule_decode()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        bm = self.block_manager
        scheduled: list[Sequence] = []
        n_tokens = 0
        while self.waiting and len(self.running) + len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            if scheduled:  # the first one always fits: max_num_batched_tokens >= max_model_len
                new = len(seq) - (0 if seq.needs_prompt_logprobs else bm.cached_prefix_len(seq.token_ids))
                if n_tokens + new > self.max_num_batched_tokens:
                    break
            if not bm.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            scheduled.append(seq)
            n_tokens += len(seq) - seq.num_cached_tokens
        if not scheduled:
            return None
        self.running.extend(scheduled)
        return ScheduledBatch(scheduled, is_prefill=True, num_tokens=n_tokens)

    def _schedule_decode(self) -> ScheduledBatch:
        bm = self.block_manager
        queue = deque(self.running)
        scheduled: list[Sequence] = []
        while queue:
            seq = queue.popleft()
            need = seq.num_cached_tokens + self.decode_tokens
            while not bm.can_grow(seq, need):
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                bm.grow(seq, need)
                scheduled.append(seq)
        self.running = scheduled
        return ScheduledBatch(list(scheduled), is_prefill=False, num_tokens=len(scheduled) * self.decode_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.draft = None
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seqs: list[Sequence]) -> None:
        """Drop finished sequences from the running batch and return their blocks."""
        done = {s.seq_id for s in seqs}
        if not done:
            return
        for seq in seqs:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        self.running = [s for s in self.running if s.seq_id not in done]

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is; returns its sequence (None if unknown or finished)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                break
        else:
            for seq in self.running:
                if seq.request_id == request_id:
                    self.running.remove(seq)
                    self.block_manager.free(seq)
                    break
            else:
                return None
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        self.num_aborted += 1
        return seq
