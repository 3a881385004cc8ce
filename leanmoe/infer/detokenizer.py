"""Incremental detokenisation for streaming, with stop strings.

A token may end in the middle of a multi-byte UTF-8 character (byte-level BPE splits emoji and
CJK characters across tokens); decoding such a prefix yields U+FFFD. Text is therefore released
only once the window of recent tokens decodes without a trailing U+FFFD. Decoding works on a
short window [prefix_offset:] rather than the whole output, so a step costs O(window), and the
text of a window is the difference between decoding it with and without its newest tokens.

Stop strings may straddle tokens: the last (longest stop - 1) characters are held back until
more text arrives or the request ends, so no prefix of a stop string is ever streamed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids with `add`; take releasable text with `take`."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.skip_special_tokens = skip_special_tokens
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0    # tokens whose text is in `text`
        self.text = ""          # decoded output (stop string and what follows cut off)
        self.emitted = 0        # characters of `text` already released
        self.stopped = False    # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> bool:
        """Append one token; returns True once a stop string has appeared (text is cut before it)."""
        if self.stopped:
            return True
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._append(full[len(prefix):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self.stopped

    def _append(self, new: str) -> None:
        start = max(0, len(self.text) - self.hold)  # a stop string may begin in held-back text
        self.text += new
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def finish(self) -> None:
        """The request ended: decode what is still pending (a trailing incomplete character
        becomes U+FFFD, as a full decode would give)."""
        if not self.stopped and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix):
                self._append(full[len(prefix):])
            self.prefix_offset = self.read_offset = len(self.ids)

    def take(self, final: bool = False) -> str:
        """Text that may be released now (everything once `final` or stopped)."""
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted: end]
        self.emitted = end
        return delta
