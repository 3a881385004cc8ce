"""leanmoe/infer/detokenizer.py: split UTF-8 characters, stop strings across tokens, hold-back."""

import pytest

from leanmoe.data.tokenizer import _byte_decoder
from leanmoe.infer.detokenizer import IncrementalDetokenizer

TEXTS = ["ship it 🚀🔥 done ✅", "오늘은 날씨가 맑아서", "我们去图书馆看书吧。", "plain ascii, with spaces  ", "café 🚀x"]


def byte_tokens(tokenizer, text):
    char_of = {b: c for c, b in _byte_decoder().items()}
    return [tokenizer.id_of(char_of[b]) for b in text.encode("utf-8")]


def stream(detok, ids):
    parts = []
    for t in ids:
        detok.add(t)
        parts.append(detok.take())
    detok.finish()
    parts.append(detok.take(final=True))
    return parts


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode_and_never_emits_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    byte_ids = byte_tokens(tokenizer, text)  # one token per byte: every multi-byte character is split
    for seq in (ids, byte_ids):
        parts = stream(IncrementalDetokenizer(tokenizer), seq)
        assert "".join(parts) == tokenizer.decode(seq) == text
        assert all("\ufffd" not in p for p in parts)


def test_split_emoji_is_held_until_complete(tokenizer):
    d = IncrementalDetokenizer(tokenizer)
    out = []
    for t in byte_tokens(tokenizer, "🚀"):  # four single-byte tokens
        d.add(t)
        out.append(d.take())
    assert out == ["", "", "", "🚀"]


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer):
    text = "one two three four five"
    d = IncrementalDetokenizer(tokenizer, stop=["thr", "zzz"])
    parts = []
    for t in byte_tokens(tokenizer, text):
        stopped = d.add(t)
        parts.append(d.take())
        if stopped:
            break
    assert d.stopped
    assert "".join(parts) == "one two "
    assert all("t" not in p for p in parts[len("one two"):])


def test_incomplete_tail_is_flushed_at_the_end(tokenizer):
    ids = tokenizer.encode("ab") + byte_tokens(tokenizer, "🚀")[:1]
    parts = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(parts) == tokenizer.decode(ids) == "ab\ufffd"
