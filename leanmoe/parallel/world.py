"""World: the processes of one run, as one object the trainer talks to whether it runs alone or
under torchrun. In a single process every method does nothing (a collective returns its input,
rank 0 is the only rank), so the training loop has no `if distributed` branches.

    world = World.join(device)          # joins torchrun's job when WORLD_SIZE > 1
    world.all_reduce_sum(t)             # SUM over ranks (t itself in one process)
    world.broadcast_float(x)            # rank 0's value everywhere
    world.rank0_first(fn, error)        # rank 0 runs fn, then the others (they reuse its files)
    world.build_mesh(ep, n_experts)     # the (dp, ep) DeviceMesh: world.dims
    world.clip_grad_norm_(params, c)    # the norm of the sharded gradients
    with world.stop_on_signals() as signalled: ...   # Ctrl-C / SIGTERM raise a flag instead
    world.close()
"""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from leanmoe.parallel import groups

__all__ = ["World"]


class World:
    """rank / size / device of this process; `dims` (ParallelDims) once `build_mesh` ran."""

    def __init__(self, device: torch.device, rank: int = 0, size: int = 1, owns_group: bool = False):
        self.device, self.rank, self.size = device, rank, size
        self.dims: groups.ParallelDims | None = None
        self._owns_group = owns_group
        self._waits = 0  # rank0_first calls so far (each waits on its own store key)

    @classmethod
    def join(cls, device: torch.device, timeout_s: float | None = None) -> World:
        """This process's world: torchrun's job (WORLD_SIZE > 1: the process group is initialised,
        collectives give up after `timeout_s`, and cuda becomes cuda:LOCAL_RANK) or a world of one."""
        if groups.env_world_size() <= 1:
            return cls(device)
        if timeout_s is not None and not (0 < timeout_s < float("inf")):
            raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout_s}")
        device = groups.local_device(device)
        owns = not groups.is_initialized()
        groups.init_process_group(device, timeout_s=timeout_s)
        return cls(device, groups.rank(), groups.world_size(), owns)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """`device` as this rank sees it (cuda -> cuda:LOCAL_RANK under torchrun)."""
        return groups.local_device(device) if self.distributed else device

    def describe(self) -> str:
        return self.dims.describe() if self.dims is not None else "1 process"

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return groups.all_reduce_sum(t) if self.distributed else t

    def broadcast_float(self, value: float) -> float:
        return groups.broadcast_float(value) if self.distributed else value

    def broadcast_str(self, text: str) -> str:
        return groups.broadcast_str(text) if self.distributed else text

    def rank0_first(self, fn: Callable[[], Any], error: Exception) -> None:
        """fn() on rank 0, then, if it worked, on the other ranks (they reuse what rank 0 built);
        they raise `error` when rank 0 failed (rank 0 raises its own)."""
        if not self.distributed:
            fn()
            return
        # NOTE: the others wait on a key of torchrun's TCPStore, not in a collective: rank 0 may take
        # longer than the collective timeout (a tokenizer trained on a large corpus); if rank 0
        # dies, the store (which it hosts) goes with it and the wait ends with an error
        import torch.distributed.distributed_c10d as c10d

        store, key = c10d._get_default_store(), f"leanmoe/rank0_first/{self._waits}"
        self._waits += 1
        if self.rank == 0:
            try:
                fn()
            except BaseException:
                store.set(key, "failed")
                raise
            store.set(key, "ok")
        else:
            store.wait([key], dt.timedelta(days=7))
            if store.get(key) != b"ok":
                raise error
            fn()

    def rank0_value(self, fn: Callable[[], str], error: Exception) -> str:
        """Rank 0's `fn()` on every rank (e.g. a folder name with a timestamp); the other ranks
        raise `error` when rank 0 failed."""
        if not self.distributed:
            return fn()
        chosen, failure = "", None
        if self.rank == 0:
            try:
                chosen = fn()
            except Exception as e:
                failure = e
        chosen = groups.broadcast_str(chosen)
        if failure is not None:
            raise failure
        if not chosen:
            raise error
        return chosen

    # ------------------------------------------------------------------ layout
    def build_mesh(self, ep: int, n_routed_experts: int | None) -> None:
        """The (dp, ep) DeviceMesh over this world (distributed only; ValueError for a bad --ep)."""
        if self.distributed:
            self.dims = groups.ParallelDims.build(ep, self.device, n_routed_experts)

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` by the global norm; in a distributed run that of the sharded gradients."""
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        from leanmoe.parallel.parallelize import clip_grad_norm_

        return clip_grad_norm_(parameters, max_norm)

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[list[int]]:
        """Distributed runs: Ctrl-C and SIGTERM (torchrun forwards it) only append to the yielded
        list, so the ranks can agree in a collective to stop after the same step. A single process
        keeps Python's KeyboardInterrupt (and the list stays empty)."""
        signalled: list[int] = []
        old = {}
        if self.distributed and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, lambda signum, frame: signalled.append(signum))
        try:
            yield signalled
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """Leave the process group if `join` created it."""
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False
