"""Process groups: the one place that turns torchrun's environment into a data x expert mesh.

    world = dp * ep ranks, laid out as a DeviceMesh of shape (dp, ep), ep innermost:

        rank = dp_index * ep + ep_index

so an EP group is `ep` consecutive ranks, i.e. GPUs of one node whenever ep <= GPUs per node
(dispatch/combine then stay on NVLink; DeepSeek-V3 section 3.4 does the same). Every rank
trains on its own micro-batches (all ranks are data parallel); experts are split across the ep
ranks of a group and FSDP-sharded across the dp groups; every other parameter is FSDP-sharded
across all ranks (a 1-D mesh of the whole world). See leanmoe.parallel.parallelize.

Single-process runs never touch torch.distributed: `ParallelDims.from_env()` says world_size 1
and nothing is initialised.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ParallelDims", "env_world_size", "init_process_group", "local_device",
           "is_initialized", "rank", "world_size", "is_rank0", "broadcast_str",
           "broadcast_float", "all_reduce_sum"]


# ---------------------------------------------------------------------------- environment
def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """The device of this process: cuda -> cuda:LOCAL_RANK under torchrun; others unchanged."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_process_group(device: torch.device, timeout_s: float | None = None) -> None:
    """Join the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env).

    NCCL carries CUDA tensors and gloo CPU ones ("cpu:gloo,cuda:nccl"), so the small host-side
    collectives (the run folder, the clock) work on GPU jobs too. Idempotent."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"distributed launch without {', '.join(missing)} in the environment: start with "
                           "`torchrun --nproc-per-node N -m leanmoe train ...` or `leanmoe train --nproc N`")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout_s is not None:
        kwargs["timeout"] = dt.timedelta(seconds=timeout_s)
    dist.init_process_group(**kwargs)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


# ---------------------------------------------------------------------------- mesh
@dataclass
class ParallelDims:
    """world_size = dp * ep. Build with `ParallelDims.build(ep, device)` after init_process_group."""

    world_size: int
    ep: int
    rank: int
    device: torch.device
    mesh: Any = None  # DeviceMesh ("dp", "ep")
    world_mesh: Any = None  # 1-D DeviceMesh of every rank (FSDP of the non-expert parameters)

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @classmethod
    def build(cls, ep: int, device: torch.device, n_routed_experts: int | None = None) -> ParallelDims:
        """Check the shape and build the (dp, ep) DeviceMesh over the initialised world."""
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if ep < 1 or world % ep:
            raise ValueError(f"--ep {ep} must divide the number of processes ({world}); choose one of "
                             f"{[d for d in range(1, world + 1) if world % d == 0]}")
        if n_routed_experts is not None and ep > 1 and n_routed_experts % ep:
            raise ValueError(f"--ep {ep} must divide the model's n_routed_experts ({n_routed_experts}) so each "
                             "rank holds the same number of experts")
        mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
        world_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("world",))
        return cls(world_size=world, ep=ep, rank=dist.get_rank(), device=device, mesh=mesh, world_mesh=world_mesh)

    @property
    def dp_mesh(self):
        """1-D mesh of the ranks holding the same experts (FSDP of the expert parameters)."""
        return self.mesh["dp"]

    @property
    def ep_group(self):
        """Process group of the ranks that share tokens in dispatch/combine."""
        return self.mesh["ep"].get_group()

    def describe(self) -> str:
        return f"{self.world_size} processes = {self.dp} data-parallel x {self.ep} expert-parallel"


# ---------------------------------------------------------------------------- small collectives
def _host_device() -> torch.device:
    # gloo carries CPU tensors; with "cpu:gloo,cuda:nccl" CPU tensors take gloo as well
    return torch.device("cpu")


def broadcast_str(text: str, src: int = 0) -> str:
    """Rank `src`'s string on every rank (bytes in tensors, no pickle)."""
    if not is_initialized():
        return text
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=_host_device())
    n = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(n, src)
    if dist.get_rank() != src:
        data = torch.empty(int(n), dtype=torch.uint8)
    dist.broadcast(data, src)
    return bytes(data.tolist()).decode()


def broadcast_float(value: float, src: int = 0) -> float:
    """Rank `src`'s float on every rank (e.g. the clock that budgets and schedules use)."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src)
    return float(t.item())


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over the group (gloo has no AVG); returns t."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
