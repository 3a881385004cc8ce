"""Expert-parallel dispatch and combine on torch.distributed: DeepEP's contract, on NCCL or gloo.

Shape legend: N tokens on this rank, D hidden, K experts per token (top-k), E experts in all,
P ranks in the EP group, L = E / P experts per rank, S rows this rank sends (token-rank
pairs), R rows it receives.

Expert e lives on rank e // L of the EP group, as its local expert e % L.

    layout = get_dispatch_layout(topk_idx, E, P)       tokens per rank / per expert, token-in-rank
    recv   = ep.dispatch(x, topk_idx, topk_weights)    DeepEP's normal-mode dispatch:
        recv.x               [R, D] each token once per rank holding one of its experts, grouped
                                    by source rank, in token order within a source
        recv.topk_idx        [R, K] local expert ids (0..L-1); -1 where the expert is elsewhere
        recv.topk_weights    [R, K] the router weights; 0 where the id is -1
        recv.num_tokens_per_expert  list[int] [L]: token copies for each local expert
        recv.handle          what combine needs to send the rows home
    y_ND   = ep.combine(y_RD, recv.handle)             every row back to its source rank, summed
                                                       over the ranks the token visited

Both are built on `all_to_all_single` with autograd: the backward of dispatch is a combine of
the gradients and the backward of combine is a dispatch, as in DeepEP. One host sync per
dispatch learns the split sizes (DeepEP's normal kernels wait on the CPU too). As DeepSeek-V3
trains (section 3.3.3), dispatch payloads can travel as FP8 E4M3 with one fp32 scale per 1x128
tile (leanmoe.kernels.fp8; the gradient passes straight through the rounding) and combine
payloads as bf16; gradients then travel in bf16 as well. Sums over a token's visits run in rank
order, in fp32 for 16-bit payloads (deterministic on GPU too).

`dispatch_allgather` / `combine_allgather` are the obvious alternative (every rank gathers every
token and keeps its own; outputs are reduce-scattered back): the reference the tests hold
dispatch to, and the baseline bench/ep.py measures against.

NOTE: unlike DeepEP, a token bound for several ranks of one remote node crosses the network once
per rank (no NVLink forwarding) and communication does not overlap computation;
leanmoe.train.scale_model estimates what that costs at scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd import Function

# torch 2.13 renamed the flat collectives; older releases have only the old names
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = ["DispatchLayout", "EPHandle", "Dispatched", "ExpertParallel", "get_dispatch_layout",
           "get_dispatch_layout_reference", "dispatch_allgather", "combine_allgather", "all_to_all"]


# ---------------------------------------------------------------------------- layout
@dataclass
class DispatchLayout:
    """Where the tokens of one rank go (DeepEP's get_dispatch_layout)."""

    num_tokens_per_rank: torch.Tensor  # [P] int32: tokens sent to each rank (each token once per rank)
    num_tokens_per_expert: torch.Tensor  # [E] int32: token copies for each expert
    is_token_in_rank: torch.Tensor  # [N, P] bool


def get_dispatch_layout(topk_idx_NK: torch.Tensor, num_experts: int, num_ranks: int) -> DispatchLayout:
    """topk_idx [N, K] int (global expert ids; -1 = no expert) -> DispatchLayout. No host sync."""
    if num_experts % num_ranks:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {num_ranks} ranks")
    n = topk_idx_NK.shape[0]
    per_rank = num_experts // num_ranks
    valid_NK = topk_idx_NK >= 0
    # invalid entries go to one extra column / bin that is dropped
    rank_NK = torch.where(valid_NK, topk_idx_NK // per_rank, num_ranks)
    in_rank_NP = torch.zeros(n, num_ranks + 1, dtype=torch.bool, device=topk_idx_NK.device)
    in_rank_NP.scatter_(1, rank_NK, True)
    in_rank_NP = in_rank_NP[:, :num_ranks]
    flat = torch.where(valid_NK, topk_idx_NK, num_experts).reshape(-1)
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    per_expert.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return DispatchLayout(in_rank_NP.sum(0, dtype=torch.int32), per_expert[:num_experts], in_rank_NP)


def get_dispatch_layout_reference(topk_idx_NK: torch.Tensor, num_experts: int, num_ranks: int) -> DispatchLayout:
    """The same as get_dispatch_layout, token by token in Python (for tests)."""
    per_rank = num_experts // num_ranks
    rows = topk_idx_NK.tolist()
    in_rank = [[False] * num_ranks for _ in rows]
    per_expert = [0] * num_experts
    for i, row in enumerate(rows):
        for e in row:
            if e >= 0:
                in_rank[i][e // per_rank] = True
                per_expert[e] += 1
    in_rank_t = torch.tensor(in_rank, dtype=torch.bool).reshape(len(rows), num_ranks)
    return DispatchLayout(in_rank_t.sum(0, dtype=torch.int32), torch.tensor(per_expert, dtype=torch.int32), in_rank_t)


# ---------------------------------------------------------------------------- rows <-> tokens
@dataclass
class EPHandle:
    """What combine (and the backward of dispatch) needs: which token each sent row is."""

    token_S: torch.Tensor  # [S] int64: the local token of each row sent (rank-major, then token order)
    send_splits: list[int]  # [P] rows sent to each rank
    recv_splits: list[int]  # [P] rows received from each rank
    num_tokens: int  # N


def _gather_rows(x: torch.Tensor, h: EPHandle) -> torch.Tensor:
    return x.index_select(0, h.token_S)


def _sum_rows(y: torch.Tensor, h: EPHandle) -> torch.Tensor:
    """Rows [S, ...] (in send order) -> per token [N, ...]: add the block of each rank in rank
    order. A token occurs at most once per block, so every index_add writes each row once: the
    sum is deterministic on GPU too. fp32 accumulation for 16-bit payloads, as DeepEP's combine."""
    acc = torch.float32 if y.dtype in (torch.bfloat16, torch.float16) else y.dtype
    out = torch.zeros((h.num_tokens, *y.shape[1:]), dtype=acc, device=y.device)
    start = 0
    for rows in h.send_splits:
        if rows:
            out.index_add_(0, h.token_S[start: start + rows], y[start: start + rows].to(acc))
        start += rows
    return out.to(y.dtype)


class _GatherRows(Function):
    """x [N, ...] -> x[token_S] [S, ...]. Backward: sum each token's rows (a combine)."""

    @staticmethod
    def forward(ctx, x, h):
        ctx.h = h
        return _gather_rows(x, h)

    @staticmethod
    def backward(ctx, g):
        return _sum_rows(g.contiguous(), ctx.h), None


class _SumRows(Function):
    """y [S, ...] -> summed per token [N, ...]. Backward: gather (a dispatch)."""

    @staticmethod
    def forward(ctx, y, h):
        ctx.h = h
        return _sum_rows(y, h)

    @staticmethod
    def backward(ctx, g):
        return _gather_rows(g.contiguous(), ctx.h), None


# ---------------------------------------------------------------------------- all-to-all
def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def _send(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, wire) -> torch.Tensor:
    """Rows of x [S, D] to their ranks -> [R, D] in x's dtype, carried on the wire as `wire`:
    None (x's dtype) or a float dtype (e.g. bf16)."""
    if wire is not None and wire != x.dtype:
        return _a2a(x.to(wire), out_splits, in_splits, group).to(x.dtype)
    return _a2a(x, out_splits, in_splits, group)


class _AllToAll(Function):
    """all_to_all_single with autograd: the backward sends the gradients back the same way.
    wire / grad_wire: None (the tensors' dtype) or a dtype to carry them in (e.g. bf16)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, wire, grad_wire):
        ctx.meta = (out_splits, in_splits, group, grad_wire)
        return _send(x, out_splits, in_splits, group, wire)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits, group, grad_wire = ctx.meta
        return _send(g.contiguous(), in_splits, out_splits, group, grad_wire), None, None, None, None, None


class _Fp8Dispatch(Function):
    """x [N, D] -> the rows each rank receives [R, D] (x's dtype), sent as FP8 E4M3 with one fp32
    scale per 1x128 tile. Each token is cast once, before it is copied to its destinations.
    Backward: the gradient rows come back (in `grad_wire`) and are summed per token, straight
    through the rounding."""

    @staticmethod
    def forward(ctx, x, h, group, grad_wire):
        from leanmoe.kernels.fp8 import FP8_DTYPE, per_token_cast_to_fp8, per_token_dequant

        ctx.meta = (h, group, grad_wire)
        d = x.shape[1]
        x_fp8, s = per_token_cast_to_fp8(x)  # [N, D] e4m3, [N, ceil(D/128)] fp32
        packed = torch.cat([x_fp8.view(torch.uint8), s.view(torch.uint8)], dim=1)  # one message per row
        recv = _a2a(packed.index_select(0, h.token_S), h.recv_splits, h.send_splits, group)
        return per_token_dequant(recv[:, :d].contiguous().view(FP8_DTYPE), recv[:, d:].contiguous().view(torch.float32),
                                 x.dtype)

    @staticmethod
    def backward(ctx, g):
        h, group, grad_wire = ctx.meta
        return _sum_rows(_send(g.contiguous(), h.send_splits, h.recv_splits, group, grad_wire), h), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None, wire=None,
               grad_wire=None) -> torch.Tensor:
    """Differentiable all_to_all_single over dim 0: x [sum(in_splits), ...] -> [sum(out_splits), ...]."""
    return _AllToAll.apply(x, out_splits, in_splits, group, wire, grad_wire)


# ---------------------------------------------------------------------------- dispatch / combine
class Dispatched(NamedTuple):
    """What dispatch returns (unpacks like DeepEP's tuple)."""

    x: torch.Tensor  # [R, D]
    topk_idx: torch.Tensor  # [R, K] int64, local expert ids or -1
    topk_weights: torch.Tensor  # [R, K], 0 where topk_idx is -1
    num_tokens_per_expert: list[int]  # [L]
    handle: EPHandle


class ExpertParallel:
    """Dispatch/combine over one expert-parallel process group. `leanmoe.parallel.parallelize`
    sets one as `moe.dispatcher` of every MoE layer, whose `experts` then hold only this rank's
    L = E / P experts (global ids rank*L .. rank*L + L - 1).

    fp8_dispatch: FP8 dispatch payloads (1x128 scales). combine_dtype: e.g. torch.bfloat16 for
    combine payloads and every gradient all-to-all (None: the tensors' own dtype).
    """

    def __init__(self, group, num_experts: int, *, fp8_dispatch: bool = False,
                 combine_dtype: torch.dtype | None = None):
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.num_ranks:
            raise ValueError(f"{num_experts} experts cannot be split evenly over an expert-parallel group of "
                             f"{self.num_ranks} ranks")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.num_ranks
        self.fp8_dispatch = fp8_dispatch
        self.combine_dtype = combine_dtype

    @property
    def first_expert(self) -> int:
        """Global id of this rank's local expert 0."""
        return self.rank * self.num_local_experts

    def __repr__(self) -> str:
        return (f"ExpertParallel(rank {self.rank} of {self.num_ranks}, experts {self.first_expert}.."
                f"{self.first_expert + self.num_local_experts - 1} of {self.num_experts}, "
                f"fp8_dispatch={self.fp8_dispatch}, combine_dtype={self.combine_dtype})")

    def dispatch(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, topk_weights_NK: torch.Tensor) -> Dispatched:
        """Send every token to each rank holding one of its experts. See the module docstring."""
        if x_ND.dim() != 2 or topk_idx_NK.dim() != 2 or topk_idx_NK.shape != topk_weights_NK.shape \
                or topk_idx_NK.shape[0] != x_ND.shape[0]:
            raise ValueError(f"dispatch: expected x [N, D], topk_idx and topk_weights [N, K], got "
                             f"{tuple(x_ND.shape)}, {tuple(topk_idx_NK.shape)}, {tuple(topk_weights_NK.shape)}")
        n, k = topk_idx_NK.shape
        p, lx = self.num_ranks, self.num_local_experts
        layout = get_dispatch_layout(topk_idx_NK, self.num_experts, p)
        in_rank_NP = layout.is_token_in_rank
        dest_S, token_S = in_rank_NP.t().nonzero(as_tuple=True)  # rank-major, token order within a rank

        # one exchange of counts: per destination, [tokens, copies for each of its L experts]
        send_PC = torch.cat([layout.num_tokens_per_rank[:, None], layout.num_tokens_per_expert.view(p, lx)], 1)
        recv_PC = torch.empty_like(send_PC)
        dist.all_to_all_single(recv_PC, send_PC, group=self.group)
        counts = torch.stack([send_PC, recv_PC]).cpu()  # host sync: the split sizes of the all-to-alls
        send_splits, recv_splits = counts[0, :, 0].tolist(), counts[1, :, 0].tolist()
        per_expert = counts[1, :, 1:].sum(0).tolist()
        h = EPHandle(token_S, send_splits, recv_splits, n)

        # each row carries the local ids (at its destination) and weights of its token's experts
        idx_SK = topk_idx_NK.index_select(0, token_S)
        local_SK = idx_SK - dest_S[:, None] * lx
        mine_SK = (idx_SK >= 0) & (local_SK >= 0) & (local_SK < lx)
        w_SK = _GatherRows.apply(topk_weights_NK, h)
        w_SK = torch.where(mine_SK, w_SK, torch.zeros((), dtype=w_SK.dtype, device=w_SK.device))
        grad_wire = self.combine_dtype  # the backward of dispatch is a combine
        if self.fp8_dispatch:
            recv_x = _Fp8Dispatch.apply(x_ND, h, self.group, grad_wire)
        else:
            recv_x = all_to_all(_GatherRows.apply(x_ND, h), recv_splits, send_splits, self.group, None, grad_wire)
        # weights and local ids in one message: ids are small integers, exact in fp32
        ids_SK = torch.where(mine_SK, local_SK, -1).to(torch.float32)
        meta = all_to_all(torch.cat([w_SK.float(), ids_SK], 1), recv_splits, send_splits, self.group)
        recv_w = meta[:, :k].to(topk_weights_NK.dtype)
        return Dispatched(recv_x, meta[:, k:].detach().long(), recv_w, per_expert, h)

    def combine(self, y_RD: torch.Tensor, handle: EPHandle) -> torch.Tensor:
        """Rows [R, D] (in dispatch's order) back to their sources, summed per token: [N, D]."""
        if y_RD.shape[0] != sum(handle.recv_splits):
            raise ValueError(f"combine: got {y_RD.shape[0]} rows but dispatch delivered {sum(handle.recv_splits)}")
        y_SD = all_to_all(y_RD, handle.send_splits, handle.recv_splits, self.group, self.combine_dtype,
                          self.combine_dtype)  # the backward of combine is a dispatch (of gradients)
        return _SumRows.apply(y_SD, handle)


# ---------------------------------------------------------------------------- the naive alternative
@dataclass
class AllGatherHandle:
    keep_M: torch.Tensor  # [R] rows of the gathered [P * n_max] tokens this rank kept
    n_max: int
    num_tokens: int


def dispatch_allgather(x_ND: torch.Tensor, topk_idx_NK: torch.Tensor, topk_weights_NK: torch.Tensor, group,
                       num_experts: int) -> Dispatched:
    """The reference / baseline dispatch: all-gather every token (and its routing) to every rank,
    keep the ones with an expert here. Same result and order as ExpertParallel.dispatch.
    Forward only (no autograd)."""
    p, r = dist.get_world_size(group), dist.get_rank(group)
    lx = num_experts // p
    n, k = topk_idx_NK.shape
    sizes = torch.empty(p, dtype=torch.int64, device=x_ND.device)
    all_gather_flat(sizes, torch.tensor([n], dtype=torch.int64, device=x_ND.device), group=group)
    n_max = int(sizes.max())  # host sync

    def gather(t: torch.Tensor, fill) -> torch.Tensor:
        padded = torch.full((n_max, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        padded[:n] = t
        out = t.new_empty((p * n_max, *t.shape[1:]))
        all_gather_flat(out, padded, group=group)
        return out

    x_MD, idx_MK, w_MK = gather(x_ND, 0), gather(topk_idx_NK, -1), gather(topk_weights_NK, 0)
    local_MK = idx_MK - r * lx
    mine_MK = (idx_MK >= 0) & (local_MK >= 0) & (local_MK < lx)
    keep_M = mine_MK.any(1).nonzero().squeeze(1)
    idx = torch.where(mine_MK, local_MK, -1)[keep_M]
    w = torch.where(mine_MK, w_MK, torch.zeros((), dtype=w_MK.dtype, device=w_MK.device))[keep_M]
    per_expert = torch.bincount(idx[idx >= 0], minlength=lx).tolist()
    return Dispatched(x_MD[keep_M], idx, w, per_expert, AllGatherHandle(keep_M, n_max, n))


def combine_allgather(y_RD: torch.Tensor, handle: AllGatherHandle, group) -> torch.Tensor:
    """The reference / baseline combine: place rows in a [P * n_max, D] buffer, reduce-scatter."""
    p = dist.get_world_size(group)
    buf = y_RD.new_zeros((p * handle.n_max, *y_RD.shape[1:]))
    buf[handle.keep_M] = y_RD
    out = y_RD.new_empty((handle.n_max, *y_RD.shape[1:]))
    reduce_scatter_flat(out, buf, group=group)
    return out[: handle.num_tokens]
