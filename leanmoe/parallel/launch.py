"""`leanmoe train --nproc N`: a one-machine shortcut that re-runs the same command under torchrun.

    leanmoe train --nproc 4 --ep 2 ...
        == python -m torch.distributed.run --standalone --nproc-per-node 4 -m leanmoe train --ep 2 ...

torchrun's `--standalone` rendezvous picks a free local port, so several jobs can share a
machine. Across machines, call torchrun yourself (docs/distributed.md).

The launcher runs torchrun in-process behind `python -m leanmoe.parallel.launch`, in a session of
its own, so that:
- Ctrl-C, or SIGTERM / SIGINT sent to the launcher's PID (a job scheduler's stop), reaches torchrun
  exactly once; torchrun passes it to every worker, and the workers agree to stop after the same
  step and save (leanmoe.parallel.world) before the launcher exits;
- a failing rank's one-line error is the whole message: torchrun's ~40-line failure summary is
  left out and the launcher exits with the rank's status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

__all__ = ["strip_nproc", "torchrun_args", "torchrun_command", "relaunch"]


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = i + 1 < len(argv)
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def torchrun_args(argv: list[str], nproc: int) -> list[str]:
    """torchrun's arguments to run `leanmoe <argv>` (minus --nproc) on `nproc` local processes."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", "leanmoe", *strip_nproc(argv)]


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line equivalent to `leanmoe <argv> --nproc nproc`."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(argv, nproc)]


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `leanmoe <argv>` under torchrun on this machine and return its exit status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc starts torchrun itself; under torchrun leave it out")
    env = dict(os.environ)
    # torchrun would set 1 thread per process (and warn); split this machine's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "leanmoe.parallel.launch", *torchrun_args(argv, nproc)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # signals reach it only through us
    stopping: list[int] = []

    def forward(signum, frame):
        if not stopping:
            print("leanmoe: stopping; the workers finish the current step and save a checkpoint "
                  "(Ctrl-C again to kill them without saving)", file=sys.stderr, flush=True)
            stopping.append(signum)
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGKILL)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 130 if stopping else code


def _run_torchrun(args: list[str]) -> int:
    """torchrun's `run` with its failure summary left out: the failing ranks have printed their
    own one-line errors. Returns the first failing rank's exit status (128 + signal if killed)."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torch.distributed.elastic's loggers set their own levels as they are created (LOGLEVEL)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        code = next((c for c in codes if c != 0), 1)
        return code if code > 0 else 128 - code
    except SignalException:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_run_torchrun(sys.argv[1:]))
