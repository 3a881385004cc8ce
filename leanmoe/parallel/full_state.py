"""Full (single-device) state of a parallelized model: gathered to rank 0 to save, sliced on load.

A checkpoint is always one HF-layout folder with full tensors, whatever the number of ranks that
wrote it, so it resumes with any world size and loads anywhere. Two kinds of sharding meet here:

    FSDP2   parameters (and AdamW moments) are DTensors: `full_tensor()` gathers them, and
            `distribute_tensor(..., src_data_rank=None)` takes this rank's slice of a full one
    EP      an MoE's experts hold only this rank's L = E / ep experts as plain per-rank tensors
            (then FSDP-sharded over dp): they are all-gathered over the EP group along dim 0,
            and on load each rank keeps rows [r*L, (r+1)*L)

NOTE: torch.distributed.checkpoint.state_dict's full_state_dict helpers know only the first
kind; they would hand rank 0 its own experts and drop the others', hence these few functions.
Gathering goes one tensor at a time, so rank 0 holds at most one full tensor on the device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from leanmoe.model.moe import MoE
from leanmoe.parallel.ep import ExpertParallel, all_gather_flat

__all__ = ["is_parallel", "expert_parallel_params", "gather_full", "full_model_state_dict",
           "local_shard", "load_full_model_state_dict", "reshard"]


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_parallel(model: torch.nn.Module) -> bool:
    """Whether parallelize() sharded `model` (FSDP DTensors or expert-parallel MoE layers)."""
    dtensor = _dtensor_cls()
    return any(isinstance(p, dtensor) for p in model.parameters()) or bool(expert_parallel_params(model))


def expert_parallel_params(model: torch.nn.Module) -> dict[str, ExpertParallel]:
    """Names of the expert-parallel parameters -> the dispatcher (EP group) they are split over."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE) and m.dispatcher is not None:
            for p in ("gate_up_proj", "down_proj"):
                out[f"{name}.experts.{p}"] = m.dispatcher
    return out


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit in its sharded state (after a forward-only pass the root keeps its
    gathered parameters), so state_dict() and the optimizer see the shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gather_full(t: torch.Tensor, ep: ExpertParallel | None = None, like_param: bool = True) -> torch.Tensor | None:
    """The full tensor behind this rank's piece `t`, on CPU on rank 0 (None on the others).
    Collective: every rank calls it in the same order. like_param=False for tensors that are not
    shaped like their parameter (AdamW's step count): never gathered over EP."""
    dtensor = _dtensor_cls()
    if isinstance(t, dtensor):
        t = t.full_tensor()
    if ep is not None and like_param and t.dim() > 0:
        parts = t.new_empty((ep.num_ranks * t.shape[0], *t.shape[1:]))
        all_gather_flat(parts, t.contiguous(), group=ep.group)
        t = parts
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return t.detach().to("cpu", copy=True).contiguous()


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() at full single-device shapes, CPU, on rank 0 ({} elsewhere). Collective."""
    reshard(model)
    ep = expert_parallel_params(model)
    out = {}
    for name, t in model.state_dict().items():
        full = gather_full(t, ep.get(name))
        if full is not None:
            out[name] = full
    return out


def local_shard(full: torch.Tensor, like: torch.Tensor, ep: ExpertParallel | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's piece of `full` laid out like `like` (a parameter, maybe a DTensor, maybe an
    EP slice). Scalars (AdamW's step) come back as they are. No communication."""
    if full.dim() == 0:
        return full
    if ep is not None:
        if full.shape[0] != ep.num_experts:
            raise ValueError(f"expected {ep.num_experts} experts along dim 0, got shape {list(full.shape)}")
        full = full.narrow(0, ep.first_expert, ep.num_local_experts)
    full = full.to(device=like.device, dtype=dtype or like.dtype)
    dtensor = _dtensor_cls()
    if isinstance(like, dtensor):
        from torch.distributed.tensor import distribute_tensor

        if tuple(full.shape) != tuple(like.shape):
            raise ValueError(f"shape {list(full.shape)} does not match the parameter's {list(like.shape)}")
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


@torch.no_grad()
def load_full_model_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full single-device tensors (every rank passes the same `state`) into the local
    shards of a parallelized model. Raises ValueError naming missing or mis-shaped tensors."""
    reshard(model)
    ep = expert_parallel_params(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} tensors of the model, e.g. {missing[:5]}")
    dtensor = _dtensor_cls()
    for name, dst in own.items():
        src = local_shard(state[name], dst, ep.get(name))
        dst_local = dst.to_local() if isinstance(dst, dtensor) else dst
        src_local = src.to_local() if isinstance(src, dtensor) else src
        if dst_local.shape != src_local.shape:
            raise ValueError(f"{name}: local shard {list(src_local.shape)} does not fit {list(dst_local.shape)}")
        dst_local.copy_(src_local)
