"""Per-request sampling parameters. Plain Python (no torch): every `Sequence` carries them, so the
scheduler and block manager are tested without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from leanmoe.infer.logprobs import MAX_LOGPROBS

__all__ = ["SamplingParams"]


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature: 0 is greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = all). top_p: keep the smallest set whose
        probability reaches top_p (1.0 = all). Both apply after temperature.
    presence_penalty, frequency_penalty: in [-2, 2]; subtracted from the logits of tokens already
        in the output (not the prompt), as OpenAI and vLLM do:
        logits -= frequency_penalty * count + presence_penalty * (count > 0).
    logit_bias: token id -> bias in [-100, 100], added to that token's logits.
        Penalties and bias apply to the raw logits, before temperature, top-k and top-p.
    seed: a request-local generator, so the output is reproducible whatever else is batched.
    logprobs: None, or return each generated token's log-probability with this many (<= 20) most
        likely alternatives -- under the distribution it was sampled from: after bias, penalties,
        temperature (1 for greedy requests), top-k and top-p (filtered tokens have -inf).
    prompt_logprobs: None, or return each prompt token's log-probability (raw model, temperature 1)
        with this many alternatives; such a prompt is computed in full (no prefix-cache reuse).
    max_tokens: most tokens to generate (the model's context may end it sooner); 0 only computes
        the prompt (with prompt_logprobs, to score it).
    stop: strings that end the output; the text stops before the first one (not included).
    stop_token_ids: token ids that end the output besides the tokenizer's eos (not included).
    ignore_eos: keep generating after eos (benchmarks, equality tests).
    skip_special_tokens: leave special tokens out of the output text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
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
        if not isinstance(self.logit_bias or {}, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        for tok, bias in self.logit_bias.items():
            if not _is_int(tok) or tok < 0:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {tok!r}")
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {tok}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must hold token ids, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
