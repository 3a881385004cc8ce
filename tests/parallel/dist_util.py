"""Run a function on N CPU processes joined by gloo, as torchrun would start them.

Workers are module-level functions (spawned processes import them by name). Each worker gets
torchrun's environment variables, so leanmoe.parallel.init_process_group takes the same path as
under torchrun. `run_checks` collects named checks from every rank into one JSON report, so one
spawn can serve several tests.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.util import free_port

TIMEOUT_S = 150


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from leanmoe.parallel.groups import init_process_group

    init_process_group(torch.device("cpu"), timeout_s=TIMEOUT_S)
    fn(*args)
    dist.barrier()  # nobody leaves while a peer is still talking to it
    dist.destroy_process_group()


def spawn(fn, world_size: int, *args, timeout_s: float = TIMEOUT_S) -> None:
    """fn(*args) on `world_size` processes; raises (with the worker's traceback) if any fails."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{world_size} workers of {fn.__name__} did not finish in {timeout_s:.0f} s")


class Checks:
    """Named checks inside a worker: `with checks("name"): ...` records pass or the traceback."""

    def __init__(self):
        self.results: dict[str, str | None] = {}

    def __call__(self, name: str):
        checks = self

        class _Ctx:
            def __enter__(self):
                return self

            def __exit__(self, exc_type, exc, tb):
                if exc is None:
                    checks.results.setdefault(name, None)
                else:
                    checks.results[name] = "".join(traceback.format_exception(exc_type, exc, tb))
                return exc_type is not None and issubclass(exc_type, Exception)  # keep going

        return _Ctx()

    def save(self, folder: str) -> None:
        import torch.distributed as dist

        Path(folder, f"rank{dist.get_rank()}.json").write_text(json.dumps(self.results))


def load_checks(folder: str | Path, world_size: int) -> dict[str, list[str]]:
    """name -> list of failures ("rank r: traceback"), empty when every rank passed."""
    out: dict[str, list[str]] = {}
    for r in range(world_size):
        for name, err in json.loads(Path(folder, f"rank{r}.json").read_text()).items():
            out.setdefault(name, [])
            if err is not None:
                out[name].append(f"rank {r}:\n{err}")
    return out


def assert_check(results: dict[str, list[str]], name: str) -> None:
    assert name in results, f"check {name!r} did not run (checks run: {sorted(results)})"
    assert not results[name], "\n".join(results[name])
