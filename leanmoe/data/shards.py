"""Token shards: the corpus tokenised once into two flat files (leanmoe.data.loader reads them).

    <cache_dir>/<key>/train.bin   token ids, uint16 (uint32 when the vocabulary has >= 65536 ids)
    <cache_dir>/<key>/val.bin
    <cache_dir>/<key>/meta.json   dtype, per-split tokens / UTF-8 bytes / documents, sources, ...

Each document is its tokens followed by <|eos|>, so a training window that crosses documents sees
the separator the model must learn to emit. The files are raw arrays (no header, no pickle),
read back with `np.memmap`: a run touches only the windows it samples, whatever the corpus size.

`key` hashes everything the tokens depend on (the sources' fingerprints, the tokenizer's, the
split and cap settings, the format version), so a second run on the same data reuses the shards
and a changed file or tokenizer rebuilds them. A build writes into a temporary folder renamed into
place at the end: an interrupted or failed build leaves no entry that a later run would trust.

The split is by document (a hash of its id, `sources.split_of`). A tiny corpus may put few or no
documents in validation (or all of them), so the boundary in the token stream train ++ val is
then moved to leave both sides usable (`carved_tokens` in meta.json records it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from leanmoe.data.sources import (DEFAULT_VAL_FRACTION, DataError, Document, FileSource, Source, describe_sources,
                                  empty_corpus_error, split_of)
from leanmoe.data.tokenizer import Tokenizer

__all__ = ["ShardSet", "build_shards", "default_cache_dir", "FORMAT_VERSION", "MIN_CORPUS_TOKENS"]

FORMAT_VERSION = 1
MIN_CORPUS_TOKENS = 1024  # below this nothing trains meaningfully
MIN_VAL_TOKENS = 16384  # validation is topped up to min(this, 10% of the corpus)
_BATCH_BYTES = 8 << 20  # text handed to one encode_batch call
_BATCH_DOCS = 4096
_PIECE_CHARS = 1 << 20  # long documents are encoded in newline-aligned pieces of at most this
_COPY_TOKENS = 1 << 24
Split = Literal["train", "val"]
SPLITS: tuple[Split, Split] = ("train", "val")


def default_cache_dir() -> Path:
    """`$LEANMOE_CACHE/shards`, or `~/.cache/leanmoe/shards`."""
    base = os.environ.get("LEANMOE_CACHE") or Path.home() / ".cache" / "leanmoe"
    return Path(base).expanduser() / "shards"


@dataclass
class ShardSet:
    """A built shard folder. `reused`: it came from the cache, nothing was tokenised."""

    path: Path
    meta: dict[str, Any]
    reused: bool = False
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | os.PathLike, reused: bool = True) -> ShardSet:
        """Open a shard folder; ValueError if it is incomplete or of another format version."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a token shard folder (meta.json: {e})") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has shard format {meta.get('format_version')}, this leanmoe reads "
                             f"{FORMAT_VERSION}; delete the folder to rebuild it")
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            f, n = path / f"{split}.bin", meta["splits"][split]["tokens"]
            if not f.is_file() or f.stat().st_size != n * itemsize:
                raise ValueError(f"{f} is missing or does not hold the {n} tokens meta.json records")
        return cls(path, meta, reused)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: Split) -> np.ndarray:
        """Read-only memmap [num_tokens(split)] of token ids (dtype `self.dtype`)."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if split not in self._arrays:
            n = self.num_tokens(split)
            self._arrays[split] = (np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))
                                   if n else np.zeros(0, dtype=self.dtype))
        return self._arrays[split]

    @property
    def train(self) -> np.ndarray:
        return self.tokens("train")

    @property
    def val(self) -> np.ndarray:
        return self.tokens("val")

    def num_tokens(self, split: Split) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def num_bytes(self, split: Split) -> int:
        """UTF-8 bytes of text the split's tokens stand for (separators count 0): the bits-per-byte
        denominator."""
        return int(self.meta["splits"][split]["bytes"])


# ---------------------------------------------------------------------------- building
def _pieces(text: str) -> list[str]:
    """`text` cut at newlines into pieces of at most _PIECE_CHARS characters (a line longer than
    that is cut where it must), so one huge document neither blocks the parallel batch encoder
    nor holds gigabytes of token objects at once."""
    if len(text) <= _PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.rfind("\n", start, start + _PIECE_CHARS)
        cut = start + _PIECE_CHARS if cut < start else cut + 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _cache_key(sources: Sequence[Source], tokenizer: Tokenizer, val_fraction: float, max_bytes: int | None) -> str:
    ident = {"format_version": FORMAT_VERSION, "sources": [s.fingerprint() for s in sources],
             "tokenizer": tokenizer.fingerprint(), "val_fraction": val_fraction, "max_bytes": max_bytes}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


class _Writer:
    """Appends token arrays to `<split>.bin` files and counts documents."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.dtype = dtype
        self.files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}
        self.docs = {s: 0 for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}

    def write(self, split: Split, ids: list[list[int]]) -> None:
        if not ids:
            return
        arr = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype)
        self.files[split].write(arr.tobytes())
        self.docs[split] += len(ids)
        self.tokens[split] += arr.size

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _tokenise(sources: Sequence[Source], tokenizer: Tokenizer, writer: _Writer, val_fraction: float,
              max_bytes: int | None, progress: bool) -> int:
    """Encode every document into `writer`; returns the UTF-8 bytes read."""
    hints = [s.size_hint() for s in sources]
    total = None if any(h is None for h in hints) else sum(hints)  # type: ignore[arg-type]
    if max_bytes is not None:
        total = max_bytes if total is None else min(total, max_bytes)
    eos = tokenizer.eos_id
    seen = 0
    batch: list[Document] = []
    batch_bytes = 0
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, dynamic_ncols=True)

    def flush() -> None:
        nonlocal batch, batch_bytes
        pieces = [_pieces(d.text) for d in batch]
        flat = tokenizer.encode_batch([p for ps in pieces for p in ps])
        out: dict[str, list[list[int]]] = {"train": [], "val": []}
        i = 0
        for doc, ps in zip(batch, pieces):
            ids = flat[i] if len(ps) == 1 else list(itertools.chain.from_iterable(flat[i:i + len(ps)]))
            i += len(ps)
            ids.append(eos)
            out[split_of(doc.id, val_fraction)].append(ids)
        for split in SPLITS:
            writer.write(split, out[split])
        bar.update(batch_bytes)
        bar.set_postfix(tokens=f"{writer.tokens['train'] + writer.tokens['val']:,}", refresh=False)
        batch, batch_bytes = [], 0

    try:
        for src in sources:
            for doc in src.iter_documents():
                n = len(doc.text.encode("utf-8"))
                batch.append(doc)
                batch_bytes += n
                seen += n
                if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
                    flush()
                if max_bytes is not None and seen >= max_bytes:
                    break
            if max_bytes is not None and seen >= max_bytes:
                break
        if batch:
            flush()
    finally:
        bar.close()
    return seen


def _copy(src: np.ndarray, f) -> None:
    for i in range(0, src.size, _COPY_TOKENS):
        f.write(np.ascontiguousarray(src[i:i + _COPY_TOKENS]).tobytes())


def _rebalance(folder: Path, dtype: np.dtype, n_train: int, n_val: int, val_fraction: float) -> int:
    """Move the train/val boundary in the stream train ++ val when val is too small (under
    min(MIN_VAL_TOKENS, 10%)) or holds more than half. Returns tokens moved train -> val
    (negative: val -> train). Memory stays bounded: only the moved tokens are copied."""
    total = n_train + n_val
    lo = min(MIN_VAL_TOKENS, total // 10)
    if n_val < lo:
        target = lo
    elif n_val > total // 2:  # shrink toward val_fraction, never grow
        target = min(n_val, max(lo, int(val_fraction * total)))
    else:
        return 0
    moved = target - n_val
    if moved == 0:
        return 0
    train_f, val_f, new_f = folder / "train.bin", folder / "val.bin", folder / ".val.bin.new"
    val = np.memmap(val_f, dtype=dtype, mode="r", shape=(n_val,)) if n_val else np.zeros(0, dtype)
    with open(new_f, "wb") as f:
        if moved > 0:  # train's tail becomes the head of val
            train = np.memmap(train_f, dtype=dtype, mode="r", shape=(n_train,))
            _copy(train[n_train - moved:], f)
            _copy(val, f)
            del train
        else:  # val's head goes onto the end of train
            with open(train_f, "ab") as t:
                _copy(val[:-moved], t)
            _copy(val[-moved:], f)
    del val
    os.replace(new_f, val_f)
    if moved > 0:
        os.truncate(train_f, (n_train - moved) * dtype.itemsize)
    return moved


def _split_bytes(folder: Path, dtype: np.dtype, n: int, token_bytes: np.ndarray, split: Split) -> int:
    if n == 0:
        return 0
    arr = np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))
    total = 0
    for i in range(0, n, _COPY_TOKENS):
        total += int(token_bytes[np.asarray(arr[i:i + _COPY_TOKENS])].sum())
    del arr
    return total


def build_shards(sources: Sequence[Source], tokenizer: Tokenizer, *, cache_dir: str | os.PathLike | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION, max_bytes: int | None = None, progress: bool = True,
                 min_tokens: int = MIN_CORPUS_TOKENS) -> ShardSet:
    """Tokenise `sources` into train/val shards under `cache_dir/<key>`, or reuse that folder.

    cache_dir: default `default_cache_dir()` ($LEANMOE_CACHE/shards or ~/.cache/leanmoe/shards).
    val_fraction: share of documents (by id hash) held out for validation.
    max_bytes: stop after this many UTF-8 bytes of documents (whole documents; None: all).
    Raises DataError when the corpus holds no text or fewer than `min_tokens` tokens.
    """
    sources = list(sources)
    if not sources:
        raise DataError("no data sources given; pass --data or leave it out to use the Python standard library")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _cache_key(sources, tokenizer, val_fraction, max_bytes)
    final = cache_dir / key
    if (final / "meta.json").is_file():
        try:
            return ShardSet.open(final, reused=True)
        except ValueError as e:
            warnings.warn(f"rebuilding token shards: {e}", stacklevel=2)
            shutil.rmtree(final, ignore_errors=True)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        meta = _build(tmp, sources, tokenizer, val_fraction, max_bytes, progress, min_tokens)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same build first: use theirs
            if not (final / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return ShardSet.open(final, reused=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardSet(final, meta, reused=False)


def _build(folder: Path, sources: list[Source], tokenizer: Tokenizer, val_fraction: float, max_bytes: int | None,
           progress: bool, min_tokens: int) -> dict[str, Any]:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writer = _Writer(folder, dtype)
    try:
        read = _tokenise(sources, tokenizer, writer, val_fraction, max_bytes, progress)
    finally:
        writer.close()
    n_docs = writer.docs["train"] + writer.docs["val"]
    total = writer.tokens["train"] + writer.tokens["val"]
    if n_docs == 0:
        raise empty_corpus_error(sources)
    if total < min_tokens:
        raise DataError(f"the corpus has only {total:,} tokens ({n_docs} documents, {read:,} bytes) in "
                        f"{describe_sources(sources)}; at least {min_tokens:,} are needed: add more text to --data")
    carved = _rebalance(folder, dtype, writer.tokens["train"], writer.tokens["val"], val_fraction)
    counts = {"train": writer.tokens["train"] - carved, "val": writer.tokens["val"] + carved}
    tb = tokenizer.token_bytes()
    skipped = {"binary_files": sum(getattr(s, "skipped_binary", 0) for s in sources if isinstance(s, FileSource)),
               "unreadable_files": sum(getattr(s, "skipped_unreadable", 0) for s in sources
                                       if isinstance(s, FileSource))}
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "sources": [s.describe() for s in sources],
        "val_fraction": val_fraction,
        "max_bytes": max_bytes,
        "bytes_read": read,
        "carved_tokens": carved,
        "skipped": skipped,
        "splits": {s: {"tokens": counts[s], "bytes": _split_bytes(folder, dtype, counts[s], tb, s),
                       "documents": writer.docs[s]} for s in SPLITS},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with open(folder / "meta.json", "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")
    return meta
