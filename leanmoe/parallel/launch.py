"""`leanmoe train --nproc N`: a one-machine shortcut that re-runs the same command under torchrun.

    leanmoe train --nproc 4 --ep 2 ...
        == python -m torch.distributed.run --standalone --nproc-per-node 4 -m leanmoe train --ep 2 ...

torchrun's `--standalone` rendezvous picks a free local port, so several jobs can share a
machine. Across machines, call torchrun yourself (docs/distributed.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["strip_nproc", "torchrun_command", "relaunch"]


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


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The command that runs `leanmoe <argv>` (minus --nproc) on `nproc` local processes."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "leanmoe", *strip_nproc(argv)]


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `leanmoe <argv>` under torchrun on this machine and return its exit status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc starts torchrun itself; under torchrun leave it out")
    env = dict(os.environ)
    # torchrun would set 1 thread per process (and warn); split this machine's cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(argv, nproc), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the workers got it too (and torchrun forwards it): they agree to stop
        print("leanmoe: stopping; the workers finish the current step and save a checkpoint "
              "(Ctrl-C again to kill them without saving)", file=sys.stderr, flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        return 130
