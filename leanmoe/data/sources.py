"""Corpus sources: turn `--data` specs into a stream of documents with stable ids.

A spec is one of
    path/to/file.txt         one text file (any suffix: the user named it, so it must be UTF-8 text)
    path/to/folder           every text file below it (by suffix, see `TEXT_SUFFIXES`); hidden
                             folders (.git, .venv) are not entered; binary files are skipped and counted
    'data/**/*.md'           a glob (quote it so the shell leaves it alone), `**` recursive
    file.jsonl               one JSON object per line; its "text" field is a document
    file.parquet             its "text" column, one document a row (needs pyarrow)
    hf:NAME[:CONFIG][@SPLIT] a Hugging Face dataset, streamed (needs `datasets`); NAME may be a hub
                             id ("wikitext", "HuggingFaceFW/fineweb-edu") or a local dataset folder
and no spec at all means the Python standard library's own source files: real, varied text that is
on every machine, so `leanmoe train` works out of the box with no download.

Inside folders and globs the suffix decides how a file is read (.jsonl and .parquet as records,
the rest as text), the same rule as for a file named alone.

Every document carries a stable id (its path relative to the spec's root, plus `#row` for
records), and the train/validation split is a hash of that id, not of its position: adding files
to a folder moves no existing document between splits, and two machines agree on the split
without talking. `fingerprint()` names exactly what a source would read, so token shards built
from it can be cached (see `leanmoe.data.shards`).
"""

from __future__ import annotations

import abc
import glob as globlib
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["DataError", "Document", "Source", "TextSource", "FileSource", "HFSource", "resolve_sources", "default_sources",
           "iter_documents", "split_of", "describe_sources", "empty_corpus_error", "TEXT_SUFFIXES",
           "DEFAULT_VAL_FRACTION"]

DEFAULT_VAL_FRACTION = 0.02  # of documents; the shard builder tops val up on tiny corpora

# Read as plain text inside folders and globs. Matched on the lower-cased suffix.
TEXT_SUFFIXES = frozenset("""
    .txt .text .md .markdown .rst .adoc .org .tex .bib .srt .csv .tsv
    .py .pyi .pyx .pxd .c .h .cc .cpp .cxx .hpp .hh .cu .cuh .m .mm .java .kt .kts .scala .groovy
    .gradle .cs .fs .vb .go .rs .swift .zig .nim .d .dart .rb .php .pl .pm .lua .r .jl .hs .ml .mli .ex .exs
    .erl .clj .el .lisp .scm .lean .v .sv .vhd .asm .s .sql .proto .graphql .js .mjs .cjs .jsx .ts .tsx .vue
    .svelte .html .htm .xml .css .scss .sass .less .json .toml .yaml .yml .ini .cfg .conf .properties
    .sh .bash .zsh .fish .ps1 .bat .cmake .mk .dockerfile .tf .nix .vim
""".split())
TEXT_NAMES = frozenset({"README", "LICENSE", "COPYING", "NOTICE", "AUTHORS", "CHANGELOG", "CONTRIBUTING",
                        "Makefile", "Dockerfile", "Rakefile", "Gemfile", "Jenkinsfile"})
RECORD_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "node_modules"})

Kind = Literal["text", "jsonl", "parquet"]


class DataError(ValueError):
    """The corpus cannot be read as asked; the message names the input and what to change."""


@dataclass(frozen=True)
class Document:
    """One document. `id` is stable across runs and machines (relative path, `#row` for records)."""

    id: str
    text: str


def split_of(doc_id: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> Literal["train", "val"]:
    """"val" for a `val_fraction` share of ids, chosen by a hash of the id alone (blake2b, so it
    does not depend on PYTHONHASHSEED, the platform or the order documents arrive in)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h / 2.0**64 < val_fraction else "train"


class Source(abc.ABC):
    """A set of documents: implement the three abstract methods (and `size_hint` if you can)."""

    @abc.abstractmethod
    def iter_documents(self) -> Iterator[Document]:
        """The documents, in a fixed order; may be called more than once."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human description, e.g. "data/ (12 text files, 3.4 MB)"."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the documents this source yields could change."""

    def size_hint(self) -> int | None:
        """Roughly how many bytes `iter_documents` reads (for progress bars); None if unknown."""
        return None


class TextSource(Source):
    """Documents held in memory: {id: text}, or a list of texts (ids "name#i"). For tests, and for
    callers that build text themselves (e.g. chat transcripts)."""

    def __init__(self, texts: dict[str, str] | Iterable[str], name: str = "memory"):
        self.name = name
        self.docs = dict(texts) if isinstance(texts, dict) else {f"{name}#{i}": t for i, t in enumerate(texts)}

    def iter_documents(self) -> Iterator[Document]:
        for doc_id, text in self.docs.items():
            if text:
                yield Document(doc_id, text)

    def describe(self) -> str:
        return f"{self.name} ({len(self.docs)} in-memory documents)"

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc_id, text in self.docs.items():
            h.update(f"{len(doc_id)}:{doc_id}{len(text)}:".encode() + text.encode("utf-8"))
        return f"text:{self.name}:{h.hexdigest()}"

    def size_hint(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.docs.values())


# ---------------------------------------------------------------------------- files
def _is_text_name(p: Path) -> bool:
    return p.suffix.lower() in TEXT_SUFFIXES or p.name in TEXT_NAMES


def _kind_of(p: Path) -> Kind | None:
    suffix = p.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        return RECORD_SUFFIXES[suffix]  # type: ignore[return-value]
    return "text" if _is_text_name(p) else None


def _read_bytes(p: Path) -> bytes:
    """The one place files are read (tests patch it to simulate unreadable files)."""
    with open(p, "rb") as f:
        return f.read()


def _need_pyarrow(what: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {what} needs pyarrow, which is not installed: pip install pyarrow ({e})") from e
    return pq


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


@dataclass(frozen=True)
class _Entry:
    path: Path
    rel: str  # posix path relative to the source's root: the document id (prefix)
    kind: Kind


class FileSource(Source):
    """Files on disk: one named file, a folder walked recursively, a glob, or the stdlib.

    `explicit` (one named file): a file that is not UTF-8 text is an error. Otherwise (folders,
    globs) binary files are skipped and counted in `skipped_binary`. `skip_unreadable`: files the
    process may not read are skipped (counted in `skipped_unreadable`) instead of raising; only the
    stdlib default uses it, since a user cannot be asked to fix permissions there.
    """

    def __init__(self, spec: str, root: Path, entries: list[_Entry], *, explicit: bool = False,
                 skip_unreadable: bool = False, label: str | None = None):
        self.spec, self.root, self.entries = spec, root, entries
        self.explicit, self.skip_unreadable = explicit, skip_unreadable
        self.label = label
        self.skipped_binary = 0
        self.skipped_unreadable = 0
        self._stats = [self._stat(e.path) for e in entries]

    @staticmethod
    def _stat(p: Path) -> tuple[int, int]:
        try:
            st = p.stat()
        except OSError:
            return (-1, -1)
        return (st.st_size, st.st_mtime_ns)

    def size_hint(self) -> int:
        return sum(max(size, 0) for size, _ in self._stats)

    def describe(self) -> str:
        n, size = len(self.entries), _human_bytes(self.size_hint())
        kinds = sorted({e.kind for e in self.entries})
        what = "text" if kinds == ["text"] else "/".join(kinds)
        label = self.label or self.spec
        if self.explicit:
            return f"{label} ({what}, {size})"
        return f"{label} ({n} {what} file{'s' if n != 1 else ''}, {size})"

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for e, (size, mtime) in sorted(zip(self.entries, self._stats), key=lambda x: x[0].rel):
            h.update(f"{e.rel}\0{e.kind}\0{size}\0{mtime}\n".encode())
        return f"files:{self.root.resolve()}:{len(self.entries)}:{h.hexdigest()}"

    def iter_documents(self) -> Iterator[Document]:
        self.skipped_binary = self.skipped_unreadable = 0
        for e in self.entries:
            if e.kind == "jsonl":
                yield from self._iter_jsonl(e)
            elif e.kind == "parquet":
                yield from self._iter_parquet(e)
            else:
                text = self._read_text(e)
                if text:
                    yield Document(e.rel, text)

    def _read_raw(self, e: _Entry) -> bytes | None:
        try:
            return _read_bytes(e.path)
        except PermissionError as err:
            if self.skip_unreadable:
                self.skipped_unreadable += 1
                return None
            raise DataError(f"cannot read {e.path}: {err}; fix its permissions or leave it out of --data") from err
        except OSError as err:
            raise DataError(f"cannot read {e.path}: {err}") from err

    def _read_text(self, e: _Entry) -> str | None:
        raw = self._read_raw(e)
        if raw is None:
            return None
        try:
            if b"\0" in raw:
                raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if self.explicit:
                raise DataError(f"{e.path} is not UTF-8 text ({err}); convert it to UTF-8 or leave it out "
                                "of --data") from err
            self.skipped_binary += 1
            return None

    def _iter_jsonl(self, e: _Entry) -> Iterator[Document]:
        try:
            f = open(e.path, encoding="utf-8", newline="")
        except OSError as err:
            raise DataError(f"cannot read {e.path}: {err}") from err
        with f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{e.path}:{lineno}: invalid JSON ({err}); each line of a .jsonl file "
                                        "must be one JSON object") from err
                    text = obj.get("text") if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        got = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
                        raise DataError(f'{e.path}:{lineno}: no string "text" field (found {got}); each line '
                                        'must be an object like {"text": "..."}')
                    if text:
                        yield Document(f"{e.rel}#{lineno}", text)
            except UnicodeDecodeError as err:
                raise DataError(f"{e.path}: not UTF-8 after line {lineno} ({err})") from err

    def _iter_parquet(self, e: _Entry) -> Iterator[Document]:
        pq = _need_pyarrow(str(e.path))
        try:
            pf = pq.ParquetFile(e.path)
        except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError types
            raise DataError(f"cannot read {e.path} as parquet: {err}") from err
        names = pf.schema_arrow.names
        if "text" not in names:
            raise DataError(f'{e.path} has no "text" column (columns: {names[:12]}); rename the column '
                            "holding the documents to text")
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise DataError(f'{e.path} row {row}: "text" is {type(text).__name__}, not a string')
                if text:
                    yield Document(f"{e.rel}#{row}", text)
                row += 1


def _walk(folder: Path, want=_kind_of) -> tuple[list[Path], int]:
    """Files below `folder` (sorted, hidden folders and _SKIP_DIRS not entered) whose kind `want`
    accepts, and how many other files were passed over."""
    found, other = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and want(p) and p.is_file():
                found.append(p)
            else:
                other += 1
    return found, other


def _entries(paths: Iterable[Path], root: Path, kind_of=_kind_of) -> list[_Entry]:
    return [_Entry(p, p.relative_to(root).as_posix(), kind_of(p) or "text") for p in paths]


def _glob_root(pattern: str) -> Path:
    """The folder before the first component with a glob character."""
    parts = []
    for part in Path(pattern).parts:
        if globlib.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _looked_for() -> str:
    return (".txt, .md, .rst, .py, .c, .cpp, .js, .ts, .go, .rs, .java, .json, .yaml, .html, ... "
            f"({len(TEXT_SUFFIXES)} suffixes in leanmoe.data.sources.TEXT_SUFFIXES), .jsonl, .parquet")


def _file_source(spec: str) -> FileSource:
    p = Path(spec).expanduser()
    if globlib.has_magic(spec) and not p.exists():
        matches = sorted(Path(m) for m in globlib.glob(str(p), recursive=True))
        if not matches:
            raise DataError(f"--data {spec!r}: the pattern matches no files")
        root = _glob_root(str(p))
        files, other = [], 0
        for m in matches:
            if m.is_dir():
                sub, n = _walk(m)
                files += sub
                other += n
            elif _kind_of(m):
                files.append(m)
            else:
                other += 1
        files = sorted(set(files))
        if not files:
            raise DataError(f"--data {spec!r}: the pattern matches {len(matches)} path(s) but no text files "
                            f"(looked for {_looked_for()})")
        return FileSource(spec, root, _entries(files, root))
    if not p.exists():
        raise DataError(f"--data {spec}: no such file or folder")
    if p.is_dir():
        files, other = _walk(p)
        if not files:
            what = f"{other} other file(s) skipped" if other else "it is empty, apart from hidden files"
            raise DataError(f"--data {spec}: the folder holds no text files ({what}; looked for {_looked_for()})")
        return FileSource(spec, p, _entries(files, p))
    try:
        with open(p, "rb"):
            pass
    except OSError as err:
        raise DataError(f"--data {spec}: cannot read it: {err}") from err
    kind = _kind_of(p) or "text"  # a file named alone is read whatever its suffix
    if kind == "parquet":
        _need_pyarrow(spec)
    return FileSource(spec, p.parent, [_Entry(p, p.name, kind)], explicit=True)


# ---------------------------------------------------------------------------- Hugging Face datasets
class HFSource(Source):
    """A Hugging Face dataset, streamed: `datasets.load_dataset(name, config, split=split,
    streaming=True)`, documents from its "text" column. Stops after `max_bytes` UTF-8 bytes (whole
    documents; the one crossing the cap is kept) when given, since hub datasets can be terabytes.
    """

    def __init__(self, name: str, config: str | None = None, split: str = "train", max_bytes: int | None = None):
        if not name:
            raise DataError("--data hf:NAME: the dataset name is empty (e.g. hf:wikitext:wikitext-2-raw-v1@train)")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive or None, got {max_bytes}")
        self.name, self.config, self.split, self.max_bytes = name, config, split, max_bytes

    @classmethod
    def from_spec(cls, spec: str, max_bytes: int | None = None) -> HFSource:
        """Parse "hf:NAME[:CONFIG][@SPLIT]"."""
        body = spec.removeprefix("hf:")
        split = "train"
        if "@" in body and "/" not in body.rsplit("@", 1)[1]:
            body, split = body.rsplit("@", 1)
            if not split:
                raise DataError(f"--data {spec}: empty split after '@' (e.g. @train)")
        # hub ids never hold ':'; a local folder may (rarely), so an existing path wins
        name, _, config = (body, "", "") if Path(body).expanduser().exists() else body.partition(":")
        return cls(os.path.expanduser(name), config or None, split, max_bytes)

    @property
    def spec(self) -> str:
        return f"hf:{self.name}" + (f":{self.config}" if self.config else "") + f"@{self.split}"

    def describe(self) -> str:
        cap = f", first {_human_bytes(self.max_bytes)}" if self.max_bytes else ""
        return f"{self.spec} (Hugging Face dataset, streamed{cap})"

    def size_hint(self) -> int | None:
        return self.max_bytes

    def fingerprint(self) -> str:
        fp = f"hf:{self.name}|{self.config}|{self.split}|{self.max_bytes}"
        local = Path(self.name)
        if local.is_dir():  # a local dataset folder: its files, like a FileSource
            files, _ = _walk(local, want=lambda p: True)
            h = hashlib.sha256()
            for f in files:
                st = f.stat()
                h.update(f"{f.relative_to(local).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            fp += f"|{local.resolve()}|{h.hexdigest()}"
        return fp

    def _load(self):
        try:
            import datasets
        except ImportError as e:
            raise DataError(f"--data {self.spec} needs the Hugging Face datasets library: pip install datasets "
                            f"({e})") from e
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as err:  # datasets raises many types (FileNotFoundError, ValueError, hub errors)
            raise DataError(f"--data {self.spec}: could not load the dataset: {type(err).__name__}: {err}") from err

    def iter_documents(self) -> Iterator[Document]:
        ds = self._load()
        seen = 0
        for row, item in enumerate(ds):
            if "text" not in item:
                raise DataError(f'--data {self.spec}: the dataset has no "text" column (columns: '
                                f"{sorted(item)[:12]}); pick a dataset/config with one")
            text = item["text"]
            if text is not None and not isinstance(text, str):
                raise DataError(f'--data {self.spec} row {row}: "text" is {type(text).__name__}, not a string')
            if text:
                yield Document(f"{self.spec}#{row}", text)
                seen += len(text.encode("utf-8"))
                if self.max_bytes is not None and seen >= self.max_bytes:
                    return


# ---------------------------------------------------------------------------- resolution
def default_sources() -> list[Source]:
    """The running interpreter's standard library sources (*.py, without site-packages)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, _ = _walk(stdlib, want=lambda p: p.suffix == ".py")
    if not files:
        raise DataError(f"no text found in the Python standard library at {stdlib} (is this a stripped "
                        "install?); point --data at a folder of text files, a .jsonl/.parquet file or hf:NAME")
    src = FileSource(str(stdlib), stdlib, _entries(files, stdlib, kind_of=lambda p: "text"),
                     skip_unreadable=True, label=f"Python {sysconfig.get_python_version()} standard library "
                                                 f"{stdlib}")
    return [src]


def resolve_sources(specs: str | Iterable[str] | None = None, *, stream_max_bytes: int | None = None) -> list[Source]:
    """Sources for `--data` specs (see the module docstring); the stdlib when there are none.

    stream_max_bytes: cap on the UTF-8 bytes read from each streamed (hf:) source.
    Raises DataError for a missing path, a folder or glob without text files, a file that cannot
    be opened, or a missing optional library (pyarrow, datasets). Files are read later, lazily.
    """
    if isinstance(specs, str):
        specs = [specs]
    specs = [s for s in (specs or []) if s and s.strip()]
    if not specs:
        return default_sources()
    out: list[Source] = []
    for spec in specs:
        spec = spec.strip()
        out.append(HFSource.from_spec(spec, stream_max_bytes) if spec.startswith("hf:") else _file_source(spec))
    return out


def _sampled(doc_id: str, sample: float) -> bool:
    # salted, so the sample is independent of the train/val split
    h = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8, salt=b"sample").digest()
    return int.from_bytes(h, "little") / 2.0**64 < sample


def iter_documents(sources: Iterable[Source], split: Literal["train", "val"] | None = None,
                   val_fraction: float = DEFAULT_VAL_FRACTION, sample: float = 1.0) -> Iterator[Document]:
    """All documents of `sources` in order; or only those of one split (e.g. "train" to fit a
    tokenizer without seeing validation text); or a deterministic `sample` share of them (by a
    hash of the id, spread evenly over the corpus rather than its first files)."""
    if not 0.0 < sample <= 1.0:
        raise ValueError(f"sample must be in (0, 1], got {sample}")
    for src in sources:
        for doc in src.iter_documents():
            if split is not None and split_of(doc.id, val_fraction) != split:
                continue
            if sample < 1.0 and not _sampled(doc.id, sample):
                continue
            yield doc


def describe_sources(sources: Iterable[Source]) -> str:
    return "; ".join(s.describe() for s in sources)


def empty_corpus_error(sources: Iterable[Source]) -> DataError:
    """The error for a corpus that yielded no text at all."""
    return DataError(f"no text found in {describe_sources(sources)}; point --data at a folder of text files, "
                     "a text file, a .jsonl/.parquet file with a text field, or hf:NAME[:CONFIG][@SPLIT]")
