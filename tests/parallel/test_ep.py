"""Dispatch / combine (leanmoe/parallel/ep.py) on 2 and 4 gloo ranks, DeepEP-test style: every
token's hidden state encodes its source rank and index, and each receiver must see exactly the
tokens routed to its experts; combine, gradients and the EP MoE layer are held to the
single-process results. Each rank regenerates every rank's inputs from seeds, so expected values
need no communication."""

from __future__ import annotations

import copy

import pytest
import torch

from leanmoe.parallel.ep import get_dispatch_layout, get_dispatch_layout_reference
from tests.parallel.dist_util import Checks, assert_check, load_checks, spawn
from tests.util import micro_config

D = 200  # not a multiple of 128: the FP8 payload has a partial 1x128 tile
K = 3


def _tokens(world: int) -> list[int]:
    # uneven, and on 4 ranks one rank has no tokens at all
    return [6, 9] if world == 2 else [7, 0, 11, 4]


def _inputs(src: int, n: int, num_experts: int):
    """Rank src's tokens: x[i, 0] = src, x[i, 1] = i; topk_idx with a few -1 entries and one token
    whose experts all live on rank 0."""
    g = torch.Generator().manual_seed(1000 + src)
    x = torch.randn(n, D, generator=g)
    x[:, 0], x[:, 1] = float(src), torch.arange(n, dtype=torch.float32)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:K] for _ in range(n)]) if n else \
        torch.zeros(0, K, dtype=torch.long)
    if n >= 3:
        idx[1] = torch.arange(K)  # all on rank 0 (local experts 0..K-1)
        idx[2, 1:] = -1  # masked slots (DeepEP allows -1)
    w = torch.rand(n, K, generator=g) + 0.1
    return x, idx, w


def _expected_rows(rank: int, world: int, num_experts: int):
    """(x, local idx, weights) of every row `rank` must receive, in DeepEP's order."""
    per = num_experts // world
    xs, idxs, ws = [], [], []
    for src, n in enumerate(_tokens(world)):
        x, idx, w = _inputs(src, n, num_experts)
        for i in range(n):
            local = [e - rank * per if e >= 0 and rank * per <= e < (rank + 1) * per else -1 for e in idx[i].tolist()]
            if any(v >= 0 for v in local):
                xs.append(x[i])
                idxs.append(local)
                ws.append([float(wv) if v >= 0 else 0.0 for wv, v in zip(w[i].tolist(), local)])
    if not xs:
        return torch.zeros(0, D), torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K)
    return torch.stack(xs), torch.tensor(idxs), torch.tensor(ws)


def _ep_worker(world: int, out_dir: str) -> None:
    import torch.distributed as dist

    from leanmoe.kernels.fp8 import per_token_cast_to_fp8, per_token_dequant
    from leanmoe.model.moe import MoE
    from leanmoe.parallel.ep import ExpertParallel, combine_allgather, dispatch_allgather
    from leanmoe.parallel.parallelize import shard_moe

    rank, group = dist.get_rank(), dist.group.WORLD
    num_experts = 4 * world
    n = _tokens(world)[rank]
    x, idx, w = _inputs(rank, n, num_experts)
    exp_x, exp_idx, exp_w = _expected_rows(rank, world, num_experts)
    dests = [[e // 4 for e in row if e >= 0] for row in idx.tolist()]  # ranks each token visits
    checks = Checks()

    # --- dispatch: every receiver sees exactly the tokens routed to its experts
    ep = ExpertParallel(group, num_experts)
    x_req = x.clone().requires_grad_()
    w_req = w.clone().requires_grad_()
    recv = ep.dispatch(x_req, idx, w_req)
    ref = dispatch_allgather(x, idx, w, group, num_experts)
    with checks("dispatch_source_encoding"):
        torch.testing.assert_close(recv.x.detach(), exp_x, rtol=0, atol=0)
        assert recv.topk_idx.tolist() == exp_idx.tolist()
        torch.testing.assert_close(recv.topk_weights.detach(), exp_w, rtol=0, atol=0)
        counts = torch.bincount(exp_idx[exp_idx >= 0], minlength=4).tolist()
        assert recv.num_tokens_per_expert == counts, (recv.num_tokens_per_expert, counts)
    with checks("dispatch_equals_allgather_reference"):
        torch.testing.assert_close(recv.x.detach(), ref.x, rtol=0, atol=0)
        assert recv.topk_idx.tolist() == ref.topk_idx.tolist()
        assert recv.num_tokens_per_expert == ref.num_tokens_per_expert

    # --- combine: each row back home, summed over the ranks the token visited; then backward
    scale = float(rank + 1)
    y_R = recv.x * scale * recv.topk_weights.sum(1, keepdim=True)
    out = ep.combine(y_R, recv.handle)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7 + rank))
    (out * g_out).sum().backward()
    out_ref = combine_allgather(ref.x * scale * ref.topk_weights.sum(1, keepdim=True), ref.handle, group)
    with checks("combine_sums_over_visited_ranks"):
        wsum = [[sum(wv for wv, e in zip(w[i].tolist(), idx[i].tolist()) if e >= 0 and e // 4 == r)
                 for r in range(world)] for i in range(n)]
        factor = torch.tensor([sum((r + 1) * wsum[i][r] for r in set(dests[i])) for i in range(n)]).reshape(n, 1)
        torch.testing.assert_close(out.detach(), x * factor, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.detach(), out_ref, rtol=1e-6, atol=1e-6)
    with checks("backward_of_dispatch_is_a_combine"):
        # d/dx of sum(g * x * factor) = g * factor; d/dw[i,k] = sum_d g*x * (rank of expert k + 1)
        torch.testing.assert_close(x_req.grad, g_out * factor, rtol=1e-5, atol=1e-5)
        gx = (g_out * x).sum(1, keepdim=True)
        rank_of = torch.where(idx >= 0, idx // 4 + 1, 0).float()
        torch.testing.assert_close(w_req.grad, gx * rank_of, rtol=1e-5, atol=1e-5)

    # --- FP8 payload (1x128 tiles) and bf16 combine
    ep8 = ExpertParallel(group, num_experts, fp8_dispatch=True, combine_dtype=torch.bfloat16)
    x8 = x.clone().requires_grad_()
    recv8 = ep8.dispatch(x8, idx, w)
    out8 = ep8.combine(recv8.x * scale, recv8.handle)
    out8.sum().backward()
    with checks("fp8_dispatch_payload"):
        q, s = per_token_cast_to_fp8(exp_x)
        torch.testing.assert_close(recv8.x.detach(), per_token_dequant(q, s), rtol=0, atol=0)
        torch.testing.assert_close(recv8.x.detach(), exp_x, rtol=2 ** -3, atol=1e-2)  # E4M3: 3 mantissa bits
    with checks("bf16_combine"):
        plain = torch.tensor([sum(r + 1 for r in set(dests[i])) for i in range(n)], dtype=torch.float32).reshape(n, 1)
        torch.testing.assert_close(out8.detach(), x * plain, rtol=0.1, atol=0.1)
        torch.testing.assert_close(x8.grad, plain.expand(n, D), rtol=1e-2, atol=1e-2)  # gradient in bf16

    # --- the EP MoE layer equals the single-process layer: outputs, input and weight gradients
    cfg = micro_config(n_routed_experts=num_experts, num_experts_per_tok=K, n_group=4, topk_group=2,
                       hidden_size=32)
    torch.manual_seed(0)
    full = MoE(cfg)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_(0, 0.3)
    moe = copy.deepcopy(full)
    shard_moe(moe, group)
    xs = [torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(50 + r)) for r in range(world)]
    gs = [torch.randn_like(t) for t in xs]
    xin = xs[rank].clone().requires_grad_()
    y, _ = moe(xin)
    (y * gs[rank]).sum().backward()
    partial = {name: p.grad.clone() for name, p in moe.named_parameters() if not name.startswith("experts.")}
    for t in partial.values():
        dist.all_reduce(t)  # what FSDP's gradient reduction sums
    load = moe.tokens_per_expert.clone()
    dist.all_reduce(load)
    xall = torch.cat(xs).requires_grad_()
    yall, _ = full(xall)
    (yall * torch.cat(gs)).sum().backward()
    with checks("ep_moe_matches_single_process"):
        lo = rank * 2
        torch.testing.assert_close(y, yall[lo: lo + 2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xin.grad, xall.grad[lo: lo + 2], rtol=1e-5, atol=1e-5)
        per = num_experts // world
        for name in ("gate_up_proj", "down_proj"):
            torch.testing.assert_close(getattr(moe.experts, name).grad,
                                       getattr(full.experts, name).grad[rank * per: (rank + 1) * per],
                                       rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        for name, t in partial.items():
            torch.testing.assert_close(t, dict(full.named_parameters())[name].grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(load, full.tokens_per_expert)

    # --- every token to rank 0's experts: the other ranks receive nothing (a decode step, say)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.fill_(-10.0)
        moe.gate.e_score_correction_bias[:K] = 10.0
        full.gate.e_score_correction_bias.copy_(moe.gate.e_score_correction_bias)
    one = xs[rank][:1, :1]
    y_one, _ = moe(one)
    y_ref, _ = full(one)
    with checks("rank_receiving_nothing"):
        torch.testing.assert_close(y_one, y_ref, rtol=1e-5, atol=1e-5)
    checks.save(out_dir)


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ep_results(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ep{request.param}")
    spawn(_ep_worker, request.param, request.param, str(folder))
    return load_checks(folder, request.param)


@pytest.mark.parametrize("check", ["dispatch_source_encoding", "dispatch_equals_allgather_reference",
                                   "combine_sums_over_visited_ranks", "backward_of_dispatch_is_a_combine",
                                   "fp8_dispatch_payload", "bf16_combine", "ep_moe_matches_single_process",
                                   "rank_receiving_nothing"])
def test_expert_parallel(ep_results, check):
    assert_check(ep_results, check)


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_layout_matches_loop(num_ranks):
    g = torch.Generator().manual_seed(num_ranks)
    idx = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(13)])
    idx[3, 2] = -1
    idx[5] = -1  # a token routed nowhere
    fast, ref = get_dispatch_layout(idx, 16, num_ranks), get_dispatch_layout_reference(idx, 16, num_ranks)
    assert torch.equal(fast.is_token_in_rank, ref.is_token_in_rank)
    assert fast.num_tokens_per_rank.tolist() == ref.num_tokens_per_rank.tolist()
    assert fast.num_tokens_per_expert.tolist() == ref.num_tokens_per_expert.tolist()
    with pytest.raises(ValueError, match="evenly"):
        get_dispatch_layout(idx, 16, 3)
