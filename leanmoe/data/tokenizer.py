"""Byte-level BPE tokenizer: trained with Hugging Face `tokenizers`, saved so transformers loads it.

Byte-level (GPT-2 style): text is first turned into its UTF-8 bytes, each byte is a base token, and
BPE merges learn longer pieces. With no normaliser and no prefix space, every string round-trips
exactly - Korean, Chinese, emoji, tabs, CRLF, trailing spaces, the empty string:
`decode(encode(s)) == s`. No text is ever out of vocabulary.

Special tokens take the first ids, in this order, so a model config can name them without looking
at the file (`ModelConfig` defaults: bos_token_id=0, eos_token_id=1):

    0 <|bos|>   1 <|eos|>   2 <|pad|>   3 <|system|>   4 <|user|>   5 <|assistant|>   6 <|end|>

Documents are separated by <|eos|> in the token shards. A chat is rendered as
`<|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>` (no newlines, no bos); the same
template is saved in Jinja in `tokenizer_config.json`, so `transformers.AutoTokenizer` renders the
identical string. Special-token strings inside ordinary text are encoded as the special tokens
(as transformers does), which is what lets a rendered chat be encoded with `encode`.

Validation bits-per-byte needs how many UTF-8 bytes each token stands for: `token_bytes()`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from leanmoe.data.sources import DataError, Document

__all__ = ["Tokenizer", "train_tokenizer", "load_tokenizer", "SPECIAL_TOKENS", "CHAT_ROLES", "CHAT_TEMPLATE",
           "DEFAULT_TRAIN_BYTES"]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_ROLES = ("system", "user", "assistant")
END = "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, *(f"<|{r}|>" for r in CHAT_ROLES), END)
N_BYTES = 256
DEFAULT_TRAIN_BYTES = 128 * 2**20  # merges settle long before this; it keeps training to a minute or so

# The Jinja twin of `Tokenizer.apply_chat_template` (transformers renders it with trim_blocks and
# lstrip_blocks; the `-` markers make the output independent of those settings).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' + message['role'] + '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: char -> byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 map to U+0100.. in order. This is
    the table `tokenizers`' ByteLevel pre-tokenizer uses (checked against `ByteLevel.alphabet()`).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(N_BYTES):
        if b not in table:
            table[b] = chr(N_BYTES + extra)
            extra += 1
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return {c: b for b, c in table.items()}


class Tokenizer:
    """Our wrapper around a `tokenizers.Tokenizer` (available as `.backend`).

    Ids are Python ints in [0, vocab_size). Encoding adds nothing (no bos/eos): callers decide
    where separators go.
    """

    def __init__(self, backend: HFTokenizer):
        spec = json.loads(backend.to_str())
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"this tokenizer lacks leanmoe's special tokens {missing}; train one with "
                             "leanmoe.data.train_tokenizer (or `leanmoe train`, which does it for you)")
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise ValueError("leanmoe needs a byte-level BPE tokenizer (ByteLevel decoder); this one has "
                             f"decoder {spec.get('decoder')!r}")
        self.backend = backend
        self._json = json.dumps(spec, sort_keys=True, ensure_ascii=False)
        self._token_bytes: np.ndarray | None = None
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._plain: HFTokenizer | None = None  # a copy that reads special-token strings as text

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0..vocab_size-1)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_of(self, token: str) -> int:
        """The id of a token string (e.g. "<|user|>"); KeyError naming it if absent."""
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def bos_id(self) -> int:
        return self.id_of(BOS)

    @property
    def eos_id(self) -> int:
        return self.id_of(EOS)

    @property
    def pad_id(self) -> int:
        return self.id_of(PAD)

    @property
    def special_ids(self) -> list[int]:
        return [self.id_of(t) for t in SPECIAL_TOKENS]

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; nothing added around it."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel threads inside `tokenizers` (Rust)."""
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. A sequence that stops inside a multi-byte UTF-8 character (a prefix of a
        generation, say) does not raise: the incomplete bytes decode to U+FFFD replacement
        characters. Incremental decoders should hold such a tail back until it completes."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> np.ndarray:
        """int64 [vocab_size]: UTF-8 bytes each token id stands for; 0 for special tokens.

        Bits per byte of a text = sum(loss in nats over its tokens) / ln 2 / token_bytes()[ids].sum().
        """
        if self._token_bytes is None:
            table = _byte_decoder()
            out = np.zeros(self.vocab_size, dtype=np.int64)
            added = self.backend.get_added_tokens_decoder()
            specials = set(self.special_ids) | {i for i, t in added.items() if t.special}
            for tok, i in self.backend.get_vocab(with_added_tokens=True).items():
                if i in specials:
                    continue
                try:
                    out[i] = len(bytes(table[c] for c in tok))
                except KeyError:  # an added non-special token stored as plain text
                    out[i] = len(tok.encode("utf-8"))
            self._token_bytes = out
        return self._token_bytes.copy()  # a copy: callers may hand it to torch, which wants it writable

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a chat: `<|role|>content<|end|>` per message, then `<|assistant|>` when
        `add_generation_prompt`. Roles: system, user, assistant. Same output as transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` on the saved
        tokenizer."""
        parts = []
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise ValueError(f"message {i}: unknown chat role {role!r}; use system, user or assistant")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            parts.append(f"<|{role}|>{content}{END}")
        if add_generation_prompt:
            parts.append("<|assistant|>")
        return "".join(parts)

    def encode_text_only(self, text: str) -> list[int]:
        """Like `encode`, but a special token's string inside `text` ("<|system|>", say) is encoded
        as ordinary text, never as the control token: for untrusted content."""
        if self._plain is None:
            plain = HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `apply_chat_template(messages)`, with each message's content encoded by
        `encode_text_only`: a user cannot open a new turn or a system message by typing its
        marker. Equal to `encode(apply_chat_template(...))` for content without such markers."""
        self.apply_chat_template(messages, add_generation_prompt=False)  # validates roles and contents
        ids: list[int] = []
        for m in messages:
            ids += [self.id_of(f"<|{m['role']}|>"), *self.encode_text_only(m["content"]), self.id_of(END)]
        if add_generation_prompt:
            ids.append(self.id_of("<|assistant|>"))
        return ids

    # ------------------------------------------------------------------ files
    def fingerprint(self) -> str:
        """A hash of the tokenizer's JSON (vocabulary, merges, settings): equal iff they encode alike."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()[:16]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `folder` (created if needed).

        `transformers.AutoTokenizer.from_pretrained(folder)` then loads it as a
        PreTrainedTokenizerFast with bos/eos/pad set and our chat template.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
            "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        _write_text(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        _write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return folder

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


def _write_text(p: Path, text: str) -> None:
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` file, or the folder holding one (as `Tokenizer.save` writes)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer at {p}: point at a tokenizer.json file or the folder holding one")
    try:
        backend = HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{p} is not a valid tokenizer.json: {e}") from e
    return Tokenizer(backend)


def _capped(texts: Iterable[str | Document], max_bytes: int | None) -> Iterator[str]:
    """Texts until `max_bytes` UTF-8 bytes have passed (the last one cut to fit, roughly)."""
    seen = 0
    for t in texts:
        t = t.text if isinstance(t, Document) else t
        if not t:
            continue
        n = len(t.encode("utf-8"))
        if max_bytes is not None and seen + n > max_bytes:
            rest = max_bytes - seen
            if rest > 0:
                yield t[:rest]  # chars, not bytes: at most 4x over for non-ASCII; a sample is a sample
            seen = max_bytes
            return
        seen += n
        yield t


def train_tokenizer(texts: Iterable[str | Document], vocab_size: int, *, max_bytes: int | None = DEFAULT_TRAIN_BYTES,
                    min_frequency: int = 2, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer with up to `vocab_size` ids (special tokens included).

    texts: strings or `Document`s, read in order until `max_bytes` UTF-8 bytes (None: all). When
        the corpus is much larger than the cap, pass a sample spread over all of it, e.g.
        `iter_documents(sources, "train", sample=cap / total_bytes)`, not just its first files.
    min_frequency: a pair seen fewer times is never merged, so a small corpus yields a smaller
        vocabulary than asked (`vocab_size` of the result tells).
    Raises ValueError if vocab_size cannot hold the 256 bytes and special tokens, DataError if
    there is no text.
    """
    least = N_BYTES + len(SPECIAL_TOKENS)
    if vocab_size < least:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs {N_BYTES} byte tokens + "
                         f"{len(SPECIAL_TOKENS)} special tokens = {least} at least (try 8192 or more)")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = {"chars": 0}

    def counted() -> Iterator[str]:
        for t in _capped(texts, max_bytes):
            seen["chars"] += len(t)
            yield t

    backend.train_from_iterator(counted(), trainer)
    if seen["chars"] == 0:
        raise DataError("no text to train the tokenizer on: the corpus yielded no documents")
    tok = Tokenizer(backend)
    assert tok.special_ids == list(range(len(SPECIAL_TOKENS))), tok.special_ids
    return tok
