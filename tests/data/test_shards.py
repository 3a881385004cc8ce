"""leanmoe/data/shards.py: building, caching, atomicity, val carving, and the deterministic loaders."""

import json
import random

import numpy as np
import pytest

from leanmoe.data import shards as SH
from leanmoe.data.loader import TokenLoader
from leanmoe.data.shards import ShardSet, build_shards, default_cache_dir
from leanmoe.data.sources import DataError, Document, Source, TextSource, resolve_sources, split_of
from leanmoe.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ("expert router token latent attention cache batch gradient 전문가 라우터 토큰 잠재 "
         "注意力 缓存 梯度 批次 🚀 def return {x} [1, 2]\t").split(" ")


def make_docs(n: int, seed: int = 0, words: int = 60) -> dict[str, str]:
    rng = random.Random(seed)
    return {f"doc{i:04d}.txt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) + "\n"
            for i in range(n)}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(make_docs(50, seed=1).values(), vocab_size=320, show_progress=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANMOE_CACHE", str(tmp_path / "cache"))


def expected_stream(tok, docs: dict[str, str], val_fraction: float) -> np.ndarray:
    """train documents then val documents, each encoded and followed by eos."""
    out = {"train": [], "val": []}
    for doc_id, text in docs.items():
        out[split_of(doc_id, val_fraction)] += tok.encode(text) + [tok.eos_id]
    return np.array(out["train"] + out["val"])


# ---------------------------------------------------------------------------- building
def test_build_writes_documents_with_eos_separators(tok, tmp_path):
    docs = make_docs(300)
    sh = build_shards([TextSource(docs)], tok, val_fraction=0.1, progress=False)
    assert not sh.reused and sh.path.parent == default_cache_dir() == tmp_path / "cache" / "shards"
    assert sorted(p.name for p in sh.path.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert sh.dtype == np.uint16 and sh.train.dtype == np.uint16
    stream = np.concatenate([sh.train, sh.val])
    np.testing.assert_array_equal(stream, expected_stream(tok, docs, 0.1))
    assert (stream == tok.eos_id).sum() == len(docs)

    meta = json.loads((sh.path / "meta.json").read_text())
    assert meta == sh.meta and meta["format_version"] == SH.FORMAT_VERSION and meta["dtype"] == "uint16"
    assert meta["tokenizer_fingerprint"] == tok.fingerprint() and meta["eos_id"] == tok.eos_id
    n_val_docs = sum(split_of(d, 0.1) == "val" for d in docs)
    assert meta["splits"]["val"]["documents"] == n_val_docs and meta["splits"]["train"]["documents"] == 300 - n_val_docs
    assert sh.num_tokens("train") == len(sh.train) and sh.num_tokens("val") == len(sh.val)
    assert sh.num_bytes("train") + sh.num_bytes("val") == sum(len(t.encode("utf-8")) for t in docs.values())
    assert meta["bytes_read"] == sh.num_bytes("train") + sh.num_bytes("val")
    tb = tok.token_bytes()
    assert sh.num_bytes("val") == tb[np.asarray(sh.val)].sum()


def test_second_build_reuses_the_cache_without_encoding(tok, monkeypatch):
    src = TextSource(make_docs(100))
    first = build_shards([src], tok, progress=False)

    def boom(*a, **k):
        raise AssertionError("re-tokenised a cached corpus")

    monkeypatch.setattr(Tokenizer, "encode_batch", boom)
    again = build_shards([src], tok, progress=False)
    assert again.reused and again.path == first.path and again.meta == first.meta
    np.testing.assert_array_equal(again.train, first.train)
    with pytest.raises(AssertionError, match="re-tokenised"):  # other inputs, other key
        build_shards([src], tok, progress=False, val_fraction=0.05)
    with pytest.raises(AssertionError, match="re-tokenised"):
        build_shards([TextSource(make_docs(101))], tok, progress=False)


def test_changed_file_rebuilds(tok, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in make_docs(60).items():
        (folder / name).write_text(text)
    first = build_shards(resolve_sources([str(folder)]), tok, progress=False)
    assert build_shards(resolve_sources([str(folder)]), tok, progress=False).reused
    (folder / "doc0000.txt").write_text("changed text, longer than before " * 5)
    second = build_shards(resolve_sources([str(folder)]), tok, progress=False)
    assert not second.reused and second.path != first.path


def test_corrupt_cache_entry_is_rebuilt(tok):
    src = TextSource(make_docs(80))
    sh = build_shards([src], tok, progress=False)
    with open(sh.path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="rebuilding token shards: .*train.bin is missing or does not hold"):
        again = build_shards([src], tok, progress=False)
    assert not again.reused and len(again.train) == len(sh.train)


class Exploding(Source):
    """Yields `n` documents, then fails like a disk error or a Ctrl-C would."""

    def __init__(self, n: int, exc: BaseException):
        self.n, self.exc = n, exc

    def iter_documents(self):
        for i, text in enumerate(make_docs(self.n).values()):
            yield Document(f"x{i}", text)
        raise self.exc

    def describe(self):
        return "exploding"

    def fingerprint(self):
        return f"exploding:{self.n}"


@pytest.mark.parametrize("exc", [OSError("disk on fire"), KeyboardInterrupt()])
def test_failed_build_leaves_no_cache_entry(tok, monkeypatch, exc):
    monkeypatch.setattr(SH, "_BATCH_DOCS", 8)  # flush (write to disk) several times before failing
    writes = []
    real_write = SH._Writer.write
    monkeypatch.setattr(SH._Writer, "write", lambda self, *a: (writes.append(1), real_write(self, *a)))
    with pytest.raises(type(exc)):
        build_shards([Exploding(50, exc)], tok, progress=False)
    assert len(writes) >= 6  # it failed halfway, not before writing anything
    assert list(default_cache_dir().iterdir()) == []  # neither the entry nor its temporary folder


def test_tiny_corpus_gets_a_usable_val_split(tok):
    docs = make_docs(40)
    sh = build_shards([TextSource(docs)], tok, val_fraction=0.0, progress=False)  # no val documents at all
    total = len(sh.train) + len(sh.val)
    assert sh.meta["splits"]["val"]["documents"] == 0 and sh.meta["carved_tokens"] == len(sh.val) == total // 10
    np.testing.assert_array_equal(np.concatenate([sh.train, sh.val]), expected_stream(tok, docs, 0.0))
    assert sh.num_bytes("train") + sh.num_bytes("val") == sum(len(t.encode("utf-8")) for t in docs.values())

    # one document that the hash puts in val: all tokens would be validation, none training
    doc_id = next(f"only{i}" for i in range(100) if split_of(f"only{i}", 0.3) == "val")
    one = {doc_id: "".join(make_docs(40).values())}
    sh = build_shards([TextSource(one)], tok, val_fraction=0.3, progress=False)
    total = len(sh.train) + len(sh.val)
    assert sh.meta["splits"]["val"]["documents"] == 1 and len(sh.val) == int(0.3 * total)
    assert sh.meta["carved_tokens"] == -len(sh.train)  # negative: moved from val to train
    np.testing.assert_array_equal(np.concatenate([sh.train, sh.val]), expected_stream(tok, one, 0.3))


@pytest.mark.parametrize("n_train, n_val, vf, moved", [
    (1000, 0, 0.0, 100),      # no val at all: carve 10% off train's tail
    (1000, 50, 0.02, 55),     # too little val: top it up to 10% of 1050
    (900, 100, 0.02, 0),      # enough: untouched
    (0, 1000, 0.02, -900),    # everything in val: hand all but 10% back to train
    (400, 600, 0.9, 0),       # val_fraction asks for more val than it has: never grow an oversized val
    (200_000, 100, 0.0, 16284),  # large corpora: val is topped up to MIN_VAL_TOKENS, not 10%
])
def test_rebalance_moves_the_boundary_of_train_then_val(tmp_path, n_train, n_val, vf, moved):
    stream = np.arange(n_train + n_val, dtype=np.uint32)
    stream[:n_train].tofile(tmp_path / "train.bin")
    stream[n_train:].tofile(tmp_path / "val.bin")
    assert SH._rebalance(tmp_path, np.dtype(np.uint32), n_train, n_val, vf) == moved
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint32)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint32)
    assert len(val) == n_val + moved
    np.testing.assert_array_equal(np.concatenate([train, val]), stream)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "val.bin"]


def test_uint32_for_large_vocabularies(tok):
    class Big(Tokenizer):
        vocab_size = 70_000

    big = Big(tok.backend)
    sh = build_shards([TextSource(make_docs(40))], big, progress=False)
    assert sh.dtype == np.uint32 and sh.meta["dtype"] == "uint32"
    np.testing.assert_array_equal(np.concatenate([sh.train, sh.val]), expected_stream(tok, make_docs(40), 0.02))


def test_max_bytes_caps_the_corpus(tok):
    docs = make_docs(200)
    sh = build_shards([TextSource(docs)], tok, max_bytes=5000, progress=False)
    assert 5000 <= sh.meta["bytes_read"] < 5000 + max(len(t) for t in docs.values()) * 4
    assert sh.meta["splits"]["train"]["documents"] + sh.meta["splits"]["val"]["documents"] < 200


def test_long_documents_are_encoded_in_pieces(tok, monkeypatch):
    monkeypatch.setattr(SH, "_PIECE_CHARS", 100)
    text = "".join(make_docs(30).values())
    pieces = SH._pieces(text)
    assert "".join(pieces) == text and all(len(p) <= 100 for p in pieces) and len(pieces) > 10
    assert SH._pieces("x" * 250) == ["x" * 100, "x" * 100, "x" * 50]
    sh = build_shards([TextSource({"long": text})], tok, progress=False)
    stream = np.concatenate([sh.train, sh.val])
    assert (stream == tok.eos_id).sum() == 1 and stream[-1] == tok.eos_id
    assert tok.decode(stream[:-1].tolist()) == text


def test_empty_and_too_small_corpora(tok, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"no text found in .*d \(1 text file.*; point --data at"):
        build_shards(resolve_sources([str(tmp_path / "d")]), tok, progress=False)
    with pytest.raises(DataError, match=r"the corpus has only \d+ tokens \(1 documents, 11 bytes\).*add more text"):
        build_shards([TextSource(["hello world"])], tok, progress=False)
    assert list(default_cache_dir().iterdir()) == []
    with pytest.raises(DataError, match="no data sources given"):
        build_shards([], tok)


def test_open_rejects_a_foreign_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a token shard folder"):
        ShardSet.open(tmp_path)


# ---------------------------------------------------------------------------- TokenLoader
def test_loader_reads_memmaps_and_covers_the_end(tok, tmp_path):
    sh = build_shards([TextSource(make_docs(100))], tok, progress=False)
    loader = TokenLoader(sh.train, 64, 8, seed=0)
    x, y = loader.next_batch()
    assert int(x.max()) < tok.vocab_size
    small = np.arange(10, dtype=np.uint16)  # exactly one window: every batch is that window
    x, y = TokenLoader(small, 2, 9, seed=0).next_batch()
    assert x.tolist() == [list(range(9))] * 2 and y.tolist() == [list(range(1, 10))] * 2
