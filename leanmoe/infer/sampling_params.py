"""Per-request sampling parameters. Plain Python (no torch): every `Sequence` carries them, so the
scheduler and block manager are tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SamplingParams"]


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = all). top_p: keep the smallest set whose
        probability reaches top_p (1.0 = all). Both apply after temperature.
    seed: a request-local generator, so the output is reproducible whatever else is batched.
    max_tokens: most tokens to generate (the model's context may end it sooner).
    stop: strings that end the output; the text stops before the first one (not included).
    stop_token_ids: token ids that end the output besides the tokenizer's eos (not included).
    ignore_eos: keep generating after eos (benchmarks, equality tests).
    skip_special_tokens: leave special tokens out of the output text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must hold token ids, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
