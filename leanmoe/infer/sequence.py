"""One request as the scheduler and block manager see it: token ids, cache blocks, status.

Plain Python (no torch): the scheduler and block manager are tested without a model.

Cache invariant between steps: `num_cached_tokens` positions (0 .. num_cached_tokens-1) hold valid
latents in every cache layer; a running sequence has `num_cached_tokens == len(token_ids) - 1`
(its last token is the next step's input). With speculative decoding the MTP layer's latent at
position i is computed from the main model's hidden state at i and token i+1, which is why it
becomes valid together with the main latents of the same position.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Any

from leanmoe.infer.sampling_params import SamplingParams

__all__ = ["Sequence", "SequenceStatus"]

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, holds no cache blocks (new, or preempted for recompute)
    RUNNING = "running"    # holds blocks for all its cached tokens
    FINISHED = "finished"  # blocks returned


class Sequence:
    """A prompt plus the tokens generated so far.

    finish_reason: None while running; "stop" (eos, a stop token or a stop string), "length"
    (max_tokens or the model's context) or "abort".
    """

    def __init__(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 stop_token_ids: frozenset[int] = frozenset(), generator: Any = None):
        if not token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else f"seq-{self.seq_id}"
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.stop_token_ids = stop_token_ids
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_digests: list[bytes] = []  # prefix digests of its leading final blocks (BlockManager)
        self.num_cached_tokens = 0
        self.num_cached_prompt_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.draft: int | None = None  # MTP draft of the next token, verified in the next step
        # leanmoe.infer.logprobs.TokenLogprob per output token / per prompt token, when asked for
        self.logprobs: list[Any] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[Any] | None = None
        self.finish_reason: str | None = None
        self.detokenizer: Any = None  # leanmoe.infer.detokenizer.IncrementalDetokenizer, set by the engine
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, len={len(self)}, cached={self.num_cached_tokens}, "
                f"blocks={self.block_table}, {self.status.value})")

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt's log-probabilities are still to compute: the next prefill must compute
        every prompt position, so it takes nothing from the prefix cache."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
