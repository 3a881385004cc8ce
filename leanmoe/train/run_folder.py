"""The run folder's own rules: which folder a run may write into, its marker, and its metrics file.

A leanmoe run folder holds `leanmoe-run.json` (the marker, written when the run starts) or, for runs
made before the marker existed, `checkpoints/`. A fresh run refuses a folder that holds other
files, so `--out` can never overwrite or append to a user's own files; a fresh run in a run folder
that never saved a checkpoint starts a clean metrics.jsonl; a run that fails before it has
anything to show removes the folder it created.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

from leanmoe.train.config import TrainingError
from leanmoe.train.run_checkpoint import latest_checkpoint

__all__ = ["RUN_MARKER", "check_run_folder", "create_run_folder", "truncate_metrics", "remove_if_unused"]

RUN_MARKER = "leanmoe-run.json"
_OUTPUTS = ("metrics.jsonl", "report.md", "loss.png", "expert_load.png")  # what a previous attempt may have left


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """TrainingError when a run may not use `run_dir`: a file, a folder of someone else's files, or
    (without --resume) a run that already has checkpoints."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--out {run_dir} is a file, not a folder; choose a folder path")
    if any(p.exists() and not p.is_dir() for p in run_dir.parents):
        raise TrainingError(f"--out {run_dir}: a part of this path is a file, not a folder; choose another path")
    if resume or not run_dir.is_dir():
        return
    if latest_checkpoint(run_dir) is not None:
        raise TrainingError(f"{run_dir} already holds a run with checkpoints; pass --resume to continue it "
                            "or choose another --out")
    if not (run_dir / RUN_MARKER).is_file() and any(run_dir.iterdir()):
        raise TrainingError(f"--out {run_dir} holds files but is not a leanmoe run folder (no {RUN_MARKER}); "
                            "choose a new or empty folder so nothing of yours is overwritten")


def create_run_folder(run_dir: Path, resume: bool) -> bool:
    """Make the folder and its marker; on a fresh start, clear the outputs of an attempt that never
    saved a checkpoint. Returns whether the folder was created here."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker = run_dir / RUN_MARKER
        if not marker.exists():
            tmp = run_dir / f".{RUN_MARKER}.tmp"
            tmp.write_text(json.dumps({"created": dt.datetime.now().isoformat(timespec="seconds")}) + "\n")
            os.replace(tmp, marker)
        if not resume:
            for name in _OUTPUTS:
                (run_dir / name).unlink(missing_ok=True)
    except OSError as e:
        raise TrainingError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from e
    return created


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines past the checkpoint being resumed (they will be recomputed)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash: drop it
            continue
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def remove_if_unused(run_dir: Path) -> bool:
    """Remove a folder this run created if the run left nothing to show in it (no checkpoint, no
    metric line): only its marker and tokenizer. Returns whether it was removed."""
    if not run_dir.is_dir() or latest_checkpoint(run_dir) is not None:
        return False
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return False
    ours = {RUN_MARKER, "tokenizer.json", "tokenizer_config.json", "metrics.jsonl", "checkpoints",
            "special_tokens_map.json"}
    if any(p.name not in ours and not p.name.startswith(".") for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True
