"""Checkpoint files read and written safely.

Read: a damaged file (truncated, a corrupt header, JSON that is not what it claims) raises
CheckpointError, a ValueError whose message is one line naming the file and what is wrong, so the
CLI prints it and exits 2 instead of showing safetensors' or json's traceback.

Written: each file's data is fsync'ed before the rename that publishes it, and a folder after
entries were renamed into it, so a crash or power loss leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = ["CheckpointError", "open_safetensors", "load_safetensors", "safetensors_error", "read_json",
           "write_text", "fsync_file", "fsync_dir", "fsync_tree"]


# ---------------------------------------------------------------------------- reading
class CheckpointError(ValueError):
    """A checkpoint file is damaged or does not match its config. The message is one line that
    names the file and what is wrong."""


_SAFETENSORS_REASONS = {  # safetensors' terse reasons, said for a user
    "header too small": "too short to hold a safetensors header (empty or truncated)",
    "header too large": "its header length is impossibly large (corrupt, or not a safetensors file)",
    "invalid header length": "its header length runs past the end of the file (truncated or corrupt)",
    "file not fully covered": "its size does not match the tensors its header lists (truncated, or bytes appended)",
    "invalid JSON in header": "its header is not valid JSON (corrupt, or not a safetensors file)",
}


def safetensors_error(path: Path | str, e: BaseException) -> CheckpointError:
    msg = str(e).removeprefix("Error while deserializing header: ")
    reason = next((r for key, r in _SAFETENSORS_REASONS.items() if key in msg), msg)
    return CheckpointError(f"{path}: damaged safetensors file: {reason}")


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """safe_open(path) whose damage (truncated file, corrupt header) is a one-line CheckpointError."""
    try:
        fh = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise safetensors_error(path, e) from None
    with fh:
        yield fh


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file, damage raised as CheckpointError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise safetensors_error(path, e) from None


def read_json(path: Path, kind: type = dict) -> Any:
    """A JSON file of the given top-level kind; CheckpointError naming the file otherwise."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}); the file is damaged") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                              "the file is damaged or truncated") from None
    if not isinstance(obj, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                              f"got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------- writing
def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename, a new file) to the disk. A no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then its subfolders (deepest first), then `folder`: what a
    rename of `folder` publishes is then on the disk."""
    folder = Path(folder)
    subdirs = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(files):
            fsync_file(Path(root) / name)
        subdirs += [Path(root) / d for d in dirs]
    for d in sorted(subdirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(folder)


def write_text(p: Path, text: str) -> None:
    """Write a text file under a temporary name, fsync it, rename it into place."""
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
