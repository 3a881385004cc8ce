"""`leanmoe train --nproc N` (leanmoe/parallel/launch.py) as a job scheduler and a careless user
meet it: SIGTERM to the launcher stops every worker the way Ctrl-C does (same step, saved), a
frozen rank makes the others give up within --dist-timeout, and a rank's error is one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.util import MICRO_TRAIN, write_corpus

pytestmark = pytest.mark.slow


@pytest.fixture
def job(tmp_path):
    write_corpus(tmp_path / "corpus", n_docs=12, lines=30)
    (tmp_path / "micro.json").write_text(json.dumps(MICRO_TRAIN))
    env = {**os.environ, "LEANMOE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def start(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "leanmoe", "train", "--config", str(tmp_path / "micro.json"), "--data",
               str(tmp_path / "corpus"), "--out", str(tmp_path / "run"), "--seq-len", "32", "--batch-size", "4",
               "--quiet", "--nproc", "2", *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs: list[subprocess.Popen] = []
    yield tmp_path / "run", lambda *extra: procs.append(start(*extra)) or procs[-1]
    for p in procs:  # never leave a job behind, whatever the test did
        if p.poll() is None:
            p.kill()
    for pid in _descendants_of_run(tmp_path / "run"):
        _kill(pid)


def _descendants_of_run(run: Path) -> list[int]:
    """PIDs of processes whose command line names this run folder (the launcher, torchrun, workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(run) in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _kill(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def _workers(run: Path, launcher: int) -> list[int]:
    """The worker PIDs: processes of this run that are neither the launcher nor torchrun."""
    return [p for p in _descendants_of_run(run) if p != launcher
            and b"leanmoe.parallel.launch" not in Path(f"/proc/{p}/cmdline").read_bytes()]


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {n} steps in {timeout} s")


def test_sigterm_to_the_launcher_stops_every_worker_after_the_same_step_and_saves(job):
    run, start = job
    proc = start("--max-steps", "100000", "--eval-interval", "100000", "--save-interval", "100000")
    _wait_for_steps(run, proc, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = (run / "checkpoints" / "latest").resolve()
    assert ckpt.name == f"step-{steps[-1]}", (ckpt, steps)  # every rank stopped after the same step and saved
    time.sleep(1)
    assert _descendants_of_run(run) == []  # no orphaned torchrun or worker keeps training


def test_a_frozen_rank_makes_the_others_give_up_within_the_timeout(job):
    run, start = job
    proc = start("--max-steps", "100000", "--eval-interval", "100000", "--save-interval", "100000",
                 "--dist-timeout", "5")
    _wait_for_steps(run, proc, 2)
    workers = _workers(run, proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        for pid in workers:
            _kill(pid)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 90, "the job did not end in a bounded time"
    assert "stopped answering" in err and "--dist-timeout 5" in err, err[-3000:]


def test_a_rank_error_is_one_line_not_torchruns_dump(job):
    run, start = job
    proc = start("--max-steps", "1", "--seq-len", "999")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("leanmoe train") for line in lines), err[-3000:]
    assert "max_position_embeddings" in err and "ChildFailedError" not in err and "Traceback" not in err
