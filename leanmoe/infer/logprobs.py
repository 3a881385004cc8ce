"""Token log-probabilities and their OpenAI shapes. Plain Python (no torch).

The engine attaches a `TokenLogprob` to each generated token of a request that asks for logprobs
(and to each prompt token when it asks for prompt logprobs); `leanmoe.infer.scoring` returns the
same objects from a full forward pass. The server turns them into OpenAI's two shapes:

    completions (`logprobs: N`, `echo`)   {"tokens": [str], "token_logprobs": [float | None],
                                           "top_logprobs": [{str: float} | None], "text_offset": [int]}
    chat (`logprobs: true, top_logprobs: N`)
                                          {"content": [{"token", "logprob", "bytes",
                                                        "top_logprobs": [{"token", "logprob", "bytes"}]}]}

A token's string is its exact text; a byte-level BPE token that holds part of a multi-byte UTF-8
character has none, and is written as OpenAI does, `bytes:\\xe2\\x80`, so that distinct tokens
always have distinct strings (completions' top_logprobs is keyed by them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TokenLogprob", "TokenStrings", "completion_logprobs", "chat_logprobs", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (vLLM's default max_logprobs)
UNLIKELY = -9999.0  # OpenAI's stand-in for a log-probability of -inf (JSON has no infinity)


@dataclass
class TokenLogprob:
    """One token: its id, log p(token | earlier tokens) (None for a prompt's first token, which has
    no context), and the most likely ids at its position with theirs, most likely first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


class TokenStrings:
    """Token id -> its bytes and its OpenAI string, cached. Works with leanmoe's Tokenizer (exact
    bytes of byte-level BPE tokens) and, through `decode([id])`, with any other tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[bytes, str]] = {}
        backend = getattr(tokenizer, "backend", None)
        self._id_to_token = getattr(backend, "id_to_token", None)
        self._table: dict[str, int] | None = None
        if self._id_to_token is not None:
            from leanmoe.data.tokenizer import _byte_decoder

            self._table = _byte_decoder()

    def _bytes(self, token_id: int) -> bytes:
        if self._id_to_token is not None:
            piece = self._id_to_token(token_id)
            if piece is not None:
                try:
                    return bytes(self._table[c] for c in piece)
                except KeyError:  # an added token stored as plain text
                    return piece.encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def get(self, token_id: int) -> tuple[bytes, str]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (raw, text)
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[1]

    def bytes(self, token_id: int) -> list[int]:
        return list(self.get(token_id)[0])


def completion_logprobs(strings: TokenStrings, entries: list[TokenLogprob], text_offset: int = 0
                        ) -> dict[str, list]:
    """OpenAI completions' `logprobs` object for `entries` (prompt tokens first when echoed).
    top_logprobs holds the requested alternatives plus the token itself, as OpenAI and vLLM do;
    text offsets count characters of the token strings from `text_offset`."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = text_offset
    for e in entries:
        s = strings.text(e.token)
        lp = None if e.logprob is None else _finite(e.logprob)
        tokens.append(s)
        lps.append(lp)
        if lp is None:
            tops.append(None)
        else:
            top = {strings.text(t): _finite(v) for t, v in e.top}
            top.setdefault(s, lp)
            tops.append(top)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(strings: TokenStrings, entries: list[TokenLogprob], top_n: int) -> dict[str, list]:
    """OpenAI chat's `logprobs` object: {"content": [one entry per token]}, each with its `top_n`
    most likely alternatives."""
    def one(token: int, lp: float) -> dict[str, Any]:
        return {"token": strings.text(token), "logprob": _finite(lp), "bytes": strings.bytes(token)}

    content = []
    for e in entries:
        item = one(e.token, e.logprob)
        item["top_logprobs"] = [one(t, lp) for t, lp in e.top[:top_n]]
        content.append(item)
    return {"content": content}


def _finite(lp: float) -> float:
    return lp if lp > UNLIKELY else UNLIKELY
