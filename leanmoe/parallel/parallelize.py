"""Apply expert parallelism, FSDP2, activation checkpointing and mixed precision to a Transformer
built as for one device (torchtitan's pattern: the model knows nothing of ranks).

    parallelize(model, dims, param_dtype=None, activation_checkpointing=False,
                fp8_dispatch=False, combine_dtype=None) -> the same model, transformed in place

In order:
1. Expert parallelism (dims.ep > 1): every MoE keeps experts [r*L, (r+1)*L) of its stacked
   weights (L = E / ep, r its rank in the EP group) and gets an ExpertParallel dispatcher.
2. Activation checkpointing: torch's composable `checkpoint` on attention, dense MLPs, shared
   experts and routed experts, which are pure functions of their inputs; the MoE's load
   counters and all-to-alls stay outside, so recomputation neither counts tokens twice nor
   repeats communication. Parameter names do not change (no wrapper modules).
3. Optionally torch.compile of the static-shape parts (`compile_dense_parts`).
4. FSDP2 (`fully_shard`), bottom-up: routed experts over the dp mesh (the ranks holding the same
   experts), routers in fp32 under mixed precision (routing stays fp32, as the single-device
   model does), each decoder block and MTP module over all ranks, then the root.

Gradient scale: each rank's loss is the mean over its own tokens and FSDP averages gradients
over its mesh. For non-expert parameters that mesh is every rank: the global mean. An expert's
gradient already sums the contributions of the tokens of all ep ranks (they arrive through the
all-to-all), so experts divide by world = dp * ep instead of dp.

Invariant the rest relies on (clip_grad_norm_, checkpoints): every parameter element lives on
exactly one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from leanmoe.model.layers import MLP
from leanmoe.model.moe import MoE
from leanmoe.model.transformer import MTPLayer, Transformer
from leanmoe.parallel.ep import ExpertParallel
from leanmoe.parallel.groups import ParallelDims

__all__ = ["parallelize", "materialize", "shard_experts", "shard_moe", "apply_activation_checkpointing",
           "apply_fsdp", "compile_dense_parts", "clip_grad_norm_"]


@torch.no_grad()
def shard_moe(moe: MoE, group, *, fp8_dispatch: bool = False, combine_dtype: torch.dtype | None = None) -> None:
    """Keep this rank's slice of one MoE's experts and install an ExpertParallel dispatcher."""
    if moe.dispatcher is not None:
        raise RuntimeError("shard_moe: this MoE's experts are already sharded")
    ep = ExpertParallel(group, moe.n_experts, fp8_dispatch=fp8_dispatch, combine_dtype=combine_dtype)
    experts = moe.experts
    lo, n = ep.first_expert, ep.num_local_experts
    for name in ("gate_up_proj", "down_proj"):
        full = getattr(experts, name)
        setattr(experts, name, nn.Parameter(full[lo: lo + n].clone(), requires_grad=full.requires_grad))
    experts.n_experts = n
    moe.dispatcher = ep


def shard_experts(model: Transformer, group, *, fp8_dispatch: bool = False,
                  combine_dtype: torch.dtype | None = None) -> None:
    """shard_moe for every MoE layer of the model (MTP modules included)."""
    for moe in model.moe_layers():
        shard_moe(moe, group, fp8_dispatch=fp8_dispatch, combine_dtype=combine_dtype)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute attention, dense MLPs and experts in backward instead of keeping their insides."""
    from torch.distributed._composable import checkpoint

    for layer in model.model.layers:
        checkpoint(layer.self_attn)
        if isinstance(layer.mlp, MoE):
            checkpoint(layer.mlp.experts)
            if layer.mlp.shared_experts is not None:
                checkpoint(layer.mlp.shared_experts)
        elif isinstance(layer.mlp, MLP):
            checkpoint(layer.mlp)


def apply_fsdp(model: Transformer, dims: ParallelDims, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32) -> None:
    """fully_shard bottom-up (see the module docstring). param_dtype: e.g. torch.bfloat16 to
    gather and compute in bf16 (mixed precision; gradients reduced in reduce_dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    world = dims.world_mesh
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            experts = fully_shard(layer.mlp.experts, mesh=dims.dp_mesh, mp_policy=mp)
            experts.set_gradient_divide_factor(float(dims.world_size))
            if dims.dp > 1:
                # sum, then divide: gloo has no PREMUL_SUM (NCCL's way of applying a custom factor).
                # NOTE: not with dp == 1, where torch 2.13 would then divide twice (no reduce-scatter)
                experts.set_force_sum_reduction_for_comms(True)
            if param_dtype is not None:
                fully_shard(layer.mlp.gate, mesh=world, mp_policy=fp32)
        if isinstance(layer, MTPLayer):
            # Transformer.mtp_step calls shared_head.norm outside the layer's forward: own unit
            fully_shard(layer.shared_head.norm, mesh=world, mp_policy=mp)
        fully_shard(layer, mesh=world, mp_policy=mp)
        if isinstance(layer, MTPLayer):  # called through forward_mtp, not __call__
            register_fsdp_forward_method(layer, "forward_mtp")
    fully_shard(model, mesh=world, mp_policy=mp)
    register_fsdp_forward_method(model, "compute_loss")


def compile_dense_parts(model: Transformer) -> None:
    """torch.compile (in place) each layer's attention, dense MLP and shared experts: the parts
    with static shapes. Routed experts (variable token counts, expert-parallel all-to-alls with
    host syncs) and the router stay eager, so nothing recompiles from step to step."""
    for layer in model.model.layers:
        layer.self_attn.compile()
        if isinstance(layer.mlp, MoE):
            if layer.mlp.shared_experts is not None:
                layer.mlp.shared_experts.compile()
        else:
            layer.mlp.compile()


def parallelize(model: Transformer, dims: ParallelDims | None, *, param_dtype: torch.dtype | None = None,
                activation_checkpointing: bool = False, fp8_dispatch: bool = False,
                combine_dtype: torch.dtype | None = None, compile: bool = False) -> Transformer:
    """Transform `model` for the mesh `dims` (None or one process: only activation checkpointing).

    Build the model identically on every rank first (same seed, or load the same weights): each
    rank keeps its own slices. Parameters move to dims.device. Returns `model` itself."""
    if not isinstance(model, Transformer):
        raise TypeError(f"parallelize expects a leanmoe Transformer, got {type(model).__name__}")
    if param_dtype is not None and param_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"param_dtype must be bf16, fp16 or fp32, got {param_dtype}")
    distributed = dims is not None and dims.world_size > 1
    if dims is not None and dims.ep > 1:
        shard_experts(model, dims.ep_group, fp8_dispatch=fp8_dispatch, combine_dtype=combine_dtype)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:  # after checkpointing and before FSDP, as torchtitan orders them
        compile_dense_parts(model)
    if distributed:
        apply_fsdp(model, dims, param_dtype)  # moves parameters and buffers to dims.device
        model.reset_buffers(dims.device)  # rope tables and load counters, rebuilt there
    elif dims is not None:
        model.to(dims.device)
    return model


@torch.no_grad()
def materialize(model: Transformer, device: torch.device | str, seed: int) -> Transformer:
    """Give a model built on the meta device and then parallelized its storage on `device`, and
    the values `Transformer.init_weights(seed)` gives the whole model: each rank computes only
    its own experts and, one at a time, the other parameters before keeping its slice. So no
    rank ever holds the whole model, and every world size starts from the same weights.

        seed = int(torch.randint(0, 2**62, ()))        # the same on every rank
        with torch.device("meta"):
            model = Transformer(cfg)
        parallelize(model, dims)
        materialize(model, dims.device, seed)
    """
    from leanmoe.parallel.full_state import expert_parallel_params, local_shard

    model.to_empty(device=device)
    ep = expert_parallel_params(model)
    for name, p in model.named_parameters():
        disp = ep.get(name)
        if disp is not None:  # this rank's experts only (the EP slice), then its FSDP piece of them
            value = model.initial_value(name, (disp.num_experts, *p.shape[1:]), seed,
                                        experts=range(disp.first_expert, disp.first_expert + disp.num_local_experts))
        else:
            value = model.initial_value(name, tuple(p.shape), seed)
        piece = local_shard(value, p)
        local = p.to_local() if hasattr(p, "to_local") else p
        local.copy_(piece.to_local() if hasattr(piece, "to_local") else piece)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.zero_()
    model.reset_buffers(device)
    return model


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, group=None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a parallelized model: every parameter element lives on
    exactly one rank (FSDP shards, EP slices), so ||g||^2 is the all-reduced sum of each rank's
    local squares. Returns the total norm before clipping (fp32, the same on every rank)."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    local: list[torch.Tensor] = []
    for p in parameters:
        if p.grad is None or id(p) in seen:
            continue
        seen.add(id(p))
        g = p.grad
        local.append(g.to_local() if isinstance(g, DTensor) else g)
    if not local:
        return torch.zeros(())
    sq = torch.stack([g.float().pow(2).sum() for g in local]).sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch: no-op when the norm is small
    for g in local:
        g.mul_(coef.to(g.dtype))
    return total
