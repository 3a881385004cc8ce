"""leanmoe/data/sources.py: every spec kind, stable ids and split, fingerprints, and each bad input."""

import itertools
import json
import os
import sys
from pathlib import Path

import pytest

from leanmoe.data import sources as S
from leanmoe.data.sources import (DataError, FileSource, HFSource, TextSource, iter_documents, resolve_sources,
                                  split_of)


def docs_of(specs, **kw) -> dict[str, str]:
    return {d.id: d.text for d in iter_documents(resolve_sources(specs, **kw))}


def write(p: Path, content: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "corpus"
    write(root / "a.txt", "alpha\r\nwith CRLF  \n")
    write(root / "sub" / "b.md", "# 제목\n본문입니다.\n")
    write(root / "sub" / "deep" / "c.py", "print('你好')\n")
    write(root / "sub" / "deep" / "empty.txt", "")
    write(root / "README", "no suffix, known name\n")
    write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(root / "sub" / "blob.txt", b"\xff\xfe\x00binary\x00")
    write(root / ".git" / "config.txt", "hidden folder\n")
    write(root / ".hidden.txt", "hidden file\n")
    write(root / "node_modules" / "x.js", "vendored\n")
    return root


# ---------------------------------------------------------------------------- files
def test_single_file_keeps_bytes_exactly(tree):
    assert docs_of([str(tree / "a.txt")]) == {"a.txt": "alpha\r\nwith CRLF  \n"}
    unusual = write(tree / "notes.weird", "named alone, so read whatever its suffix\n")
    assert docs_of(str(unusual)) == {"notes.weird": "named alone, so read whatever its suffix\n"}


def test_folder_walks_text_files_and_skips_the_rest(tree):
    (src,) = resolve_sources([str(tree)])
    got = {d.id: d.text for d in src.iter_documents()}
    assert list(got) == ["README", "a.txt", "sub/b.md", "sub/deep/c.py"]  # sorted, relative, posix
    assert got["sub/b.md"] == "# 제목\n본문입니다.\n"
    assert src.skipped_binary == 1  # sub/blob.txt; image.png is skipped by suffix before reading
    assert "6 text files" in src.describe()  # blob.txt and empty.txt are listed, then skipped when read


def test_glob(tree):
    assert list(docs_of([str(tree / "**" / "*.txt")])) == ["a.txt"]  # ids relative to the glob's root
    assert list(docs_of([str(tree / "sub" / "**" / "*.py")])) == ["deep/c.py"]
    assert list(docs_of([str(tree / "su*")])) == ["sub/b.md", "sub/deep/c.py"]  # a matched folder is walked
    with pytest.raises(DataError, match=r"the pattern matches no files"):
        resolve_sources([str(tree / "**" / "*.nothing")])
    with pytest.raises(DataError, match=r"matches 1 path\(s\) but no text files"):
        resolve_sources([str(tree / "*.png")])


def test_several_specs_chain_in_order(tree):
    got = docs_of([str(tree / "a.txt"), str(tree / "sub" / "deep")])
    assert list(got) == ["a.txt", "c.py"]


def test_fingerprint_tracks_names_sizes_and_mtimes(tree):
    fp = resolve_sources([str(tree)])[0].fingerprint()
    assert resolve_sources([str(tree)])[0].fingerprint() == fp
    st = (tree / "a.txt").stat()
    os.utime(tree / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fp2 = resolve_sources([str(tree)])[0].fingerprint()
    assert fp2 != fp
    write(tree / "new.txt", "more\n")
    assert resolve_sources([str(tree)])[0].fingerprint() not in (fp, fp2)


# ---------------------------------------------------------------------------- records
def test_jsonl(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "first", "meta": 1}\n\n{"text": "두 번째\\n"}\r\n{"text": ""}\n')
    assert docs_of(str(f)) == {"d.jsonl#1": "first", "d.jsonl#3": "두 번째\n"}
    write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        docs_of(str(tmp_path / "bad.jsonl"))
    write(tmp_path / "notext.jsonl", '{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"notext\.jsonl:2: no string \"text\" field \(found keys \['body'\]\)"):
        docs_of(str(tmp_path / "notext.jsonl"))
    write(tmp_path / "list.jsonl", '["text"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: .*found list"):
        docs_of(str(tmp_path / "list.jsonl"))


def test_jsonl_inside_a_folder_is_read_as_records(tmp_path):
    write(tmp_path / "c" / "x.jsonl", '{"text": "rec"}\n')
    write(tmp_path / "c" / "y.txt", "plain")
    assert docs_of(str(tmp_path / "c")) == {"x.jsonl#1": "rec", "y.txt": "plain"}


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["one", None, "", "세 번째 🙂"], "n": [1, 2, 3, 4]}), tmp_path / "d.parquet")
    assert docs_of(str(tmp_path / "d.parquet")) == {"d.parquet#0": "one", "d.parquet#3": "세 번째 🙂"}
    assert docs_of(str(tmp_path / "*.parquet")) == {"d.parquet#0": "one", "d.parquet#3": "세 번째 🙂"}
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r'other\.parquet has no "text" column \(columns: \[\'content\'\]\)'):
        docs_of(str(tmp_path / "other.parquet"))
    write(tmp_path / "fake.parquet", "not parquet")
    with pytest.raises(DataError, match=r"cannot read .*fake\.parquet as parquet"):
        docs_of(str(tmp_path / "fake.parquet"))


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    write(tmp_path / "d.parquet", "whatever")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="needs pyarrow.*pip install pyarrow"):
        resolve_sources([str(tmp_path / "d.parquet")])


# ---------------------------------------------------------------------------- Hugging Face datasets
@pytest.fixture
def hf_folder(tmp_path, monkeypatch) -> Path:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # no writes to ~
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "mydataset"
    rows = [{"text": f"train row {i} 행 {i}"} for i in range(5)]
    write(folder / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write(folder / "validation.jsonl", '{"text": "held out"}\n')
    return folder


def test_hf_local_dataset(hf_folder):
    (src,) = resolve_sources([f"hf:{hf_folder}"])
    assert isinstance(src, HFSource) and src.split == "train" and src.config is None
    got = {d.id: d.text for d in src.iter_documents()}
    assert len(got) == 5 and got[f"hf:{hf_folder}@train#3"] == "train row 3 행 3"
    assert "Hugging Face dataset" in src.describe()
    assert docs_of([f"hf:{hf_folder}@validation"]) == {f"hf:{hf_folder}@validation#0": "held out"}
    capped = docs_of([f"hf:{hf_folder}"], stream_max_bytes=20)  # rows are ~20 bytes: stops after 1-2
    assert 1 <= len(capped) <= 2
    with pytest.raises(DataError, match=r"@nosuchsplit: could not load the dataset: .*nosuchsplit"):
        docs_of([f"hf:{hf_folder}@nosuchsplit"])


def test_hf_fingerprint_follows_spec_and_local_files(hf_folder):
    fp = HFSource.from_spec(f"hf:{hf_folder}").fingerprint()
    assert HFSource.from_spec(f"hf:{hf_folder}@validation").fingerprint() != fp
    assert HFSource.from_spec(f"hf:{hf_folder}", max_bytes=100).fingerprint() != fp
    write(hf_folder / "train.jsonl", '{"text": "changed"}\n')
    assert HFSource.from_spec(f"hf:{hf_folder}").fingerprint() != fp


def test_hf_spec_parsing():
    s = HFSource.from_spec("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train", max_bytes=10**6)
    assert (s.name, s.config, s.split, s.max_bytes) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", 10**6)
    s = HFSource.from_spec("hf:wikitext:wikitext-2-raw-v1@validation")
    assert (s.name, s.config, s.split) == ("wikitext", "wikitext-2-raw-v1", "validation")
    s = HFSource.from_spec("hf:roneneldan/TinyStories")
    assert (s.name, s.config, s.split) == ("roneneldan/TinyStories", None, "train")
    assert s.fingerprint() == "hf:roneneldan/TinyStories|None|train|None"
    with pytest.raises(DataError, match="empty split"):
        HFSource.from_spec("hf:x@")
    with pytest.raises(DataError, match="dataset name is empty"):
        HFSource.from_spec("hf:")


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (src,) = resolve_sources(["hf:someone/something"])  # resolving is lazy; reading needs the library
    with pytest.raises(DataError, match="pip install datasets"):
        next(src.iter_documents())


# ---------------------------------------------------------------------------- default: the stdlib
def test_default_is_the_stdlib():
    for specs in (None, [], [""]):
        (src,) = resolve_sources(specs)
        assert isinstance(src, FileSource) and "standard library" in src.describe()
    rels = [e.rel for e in src.entries]
    assert len(rels) > 200 and all(r.endswith(".py") for r in rels)
    assert not any(part in ("site-packages", "dist-packages") for r in rels for part in r.split("/"))
    assert sum(split_of(r) == "val" for r in rels) >= 10  # a usable validation set by documents alone
    first = list(itertools.islice(src.iter_documents(), 5))  # read a few, not all of it
    assert len(first) == 5 and all(d.text and d.id.endswith(".py") for d in first)


# ---------------------------------------------------------------------------- split
def test_split_is_a_stable_hash_of_the_id():
    ids = [f"doc/{i}.txt" for i in range(20000)]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [split_of(i, 0.1) for i in ids]
    assert 0.09 < splits.count("val") / len(ids) < 0.11
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])
    # blake2b, not hash(): the same on every machine and every run. Pinned, because changing the
    # hash would silently move documents between splits of existing runs.
    assert [i for i in range(300) if split_of(f"doc/{i}.txt", 0.02) == "val"] == [46, 63, 151, 214, 220, 273]
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        split_of("x", 1.0)


def test_iter_documents_by_split():
    src = TextSource({f"d{i}": f"text {i}" for i in range(200)})
    val = [d.id for d in iter_documents([src], "val", 0.2)]
    train = [d.id for d in iter_documents([src], "train", 0.2)]
    assert sorted(val + train, key=lambda s: int(s[1:])) == [f"d{i}" for i in range(200)]
    assert 10 < len(val) < 70
    sample = [d.id for d in iter_documents([src], sample=0.25)]
    assert sample == [d.id for d in iter_documents([src], sample=0.25)] and 25 < len(sample) < 75
    assert len([d for d in iter_documents([src], "train", 0.2, sample=0.25) if d.id in val]) == 0
    with pytest.raises(ValueError, match=r"sample must be in \(0, 1\]"):
        next(iter_documents([src], sample=0))


# ---------------------------------------------------------------------------- bad input
def test_missing_path():
    with pytest.raises(DataError, match=r"--data /no/such/place: no such file or folder"):
        resolve_sources(["/no/such/place"])


def test_folder_without_text_files(tmp_path):
    write(tmp_path / "d" / "x.bin", b"\x00\x01")
    write(tmp_path / "d" / ".git" / "a.txt", "hidden")
    with pytest.raises(DataError, match=r"folder holds no text files \(1 other file\(s\) skipped; looked for .*\.md"):
        resolve_sources([str(tmp_path / "d")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files .it is empty"):
        resolve_sources([str(tmp_path / "empty")])


def test_explicit_file_that_is_not_utf8(tmp_path):
    f = write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    (src,) = resolve_sources([str(f)])
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(.*can't decode byte 0xe9"):
        list(src.iter_documents())
    write(tmp_path / "folder" / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(tmp_path / "folder" / "ok.txt", "fine")
    (src,) = resolve_sources([str(tmp_path / "folder")])
    assert [d.id for d in src.iter_documents()] == ["ok.txt"] and src.skipped_binary == 1


def test_unreadable_file(tmp_path, monkeypatch):
    write(tmp_path / "d" / "secret.txt", "x")

    def denied(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(S, "_read_bytes", denied)
    (src,) = resolve_sources([str(tmp_path / "d")])
    with pytest.raises(DataError, match=r"cannot read .*secret\.txt: .*Permission denied.*fix its permissions"):
        list(src.iter_documents())
    lenient = FileSource("x", src.root, src.entries, skip_unreadable=True)  # how the stdlib default reads
    assert list(lenient.iter_documents()) == [] and lenient.skipped_unreadable == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_for_real(tmp_path):
    f = write(tmp_path / "secret.txt", "x")
    f.chmod(0)
    try:
        with pytest.raises(DataError, match="Permission denied"):
            resolve_sources([str(f)])
    finally:
        f.chmod(0o644)
