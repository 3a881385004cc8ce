"""A model of expert-parallel traffic at scale: bytes and seconds of dispatch/combine per training
step for a config on a cluster shape, checked against DeepEP's published H800 figures.

    python -m leanmoe.train.scale_model --preset deepseek-v3 --ep 64 --tokens-per-rank 4096
    python -m leanmoe.train.scale_model --deepep-check

Assumptions (each is a parameter or stated here):
- Balanced routing: each token's experts come from the config's own Router (group-limited top-k
  included) on i.i.d. random logits, as an aux-loss-free-balanced router spreads them (DeepEP's
  benchmark draws random scores the same way). Averages come from a Monte Carlo of 4096 tokens.
- Layout: EP rank r holds experts [r*L, (r+1)*L), L = E / ep; ranks fill nodes of G GPUs in order.
- Payload per token and destination: FP8 dispatch D bytes + one fp32 scale per 128 values (as
  DeepEP counts it: bf16 bytes x (1 + 4/128) / 2), bf16 2D bytes otherwise. leanmoe also sends
  K local ids (int32) and K weights (fp32) with each dispatched row.
- Links: NVLink at `nvlink_gbps` and one NIC per GPU (rail-optimised, as DeepSeek's cluster) at
  `rdma_gbps` GB/s per direction; a transfer runs at `efficiency` x nominal; NVLink and RDMA
  traffic overlap, so a phase lasts as long as the slower link needs. No overlap with compute.
- Two transports:
    deepep   hierarchical (DeepEP's normal kernels): a token crosses the network once per remote
             node, to the GPU with the sender's local index, which forwards it over NVLink
    leanmoe  all_to_all_single (NCCL): a token crosses the network once per remote destination
             rank, and NVLink once per other destination rank of its own node
- A training step moves, per MoE layer and micro-batch: dispatch (FP8 or bf16) and combine (bf16)
  forward; their gradients backward (a combine and a dispatch, bf16).

Check (DEEPEP_H800): DeepEP's README (in the DeepEP repository, since moved to its docs/legacy.md; normal kernels, V1) measured H800s with
~160 GB/s NVLink and CX7 400 Gb/s (~50 GB/s) RDMA, 4096 tokens per rank, hidden 7168, top-8 of
256 experts (top-4 node groups), FP8 dispatch and bf16 combine: 153 / 158 GB/s intranode at EP8
(NVLink), 43 / 43, 58 / 57 and 51 / 50 GB/s internode at EP16 / 32 / 64 (RDMA). DeepEP reports
"logical" bandwidth: intranode, all received bytes (its own included) over the time; internode,
tokens x nodes they visit (the sender's own node included) x bytes over the time. With one
efficiency of 0.85 for both links the model reproduces all eight figures within ~10%.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from leanmoe.config import ModelConfig

__all__ = ["Cluster", "RoutingStats", "routing_stats", "phase_time", "step_estimate", "deepep_check",
           "DEEPEP_H800"]

# (ep, dispatch GB/s, combine GB/s, link) from DeepEP's README (normal kernels, H800, 4096 tokens)
DEEPEP_H800 = [(8, 153.0, 158.0, "NVLink"), (16, 43.0, 43.0, "RDMA"), (32, 58.0, 57.0, "RDMA"),
               (64, 51.0, 50.0, "RDMA")]


@dataclass
class Cluster:
    gpus_per_node: int = 8
    nvlink_gbps: float = 160.0  # GB/s per GPU per direction (H800: ~160 as DeepEP measured it)
    rdma_gbps: float = 50.0  # GB/s per GPU per direction (CX7 400 Gb/s)
    efficiency: float = 0.85  # fraction of nominal bandwidth a tuned all-to-all sustains


@dataclass
class RoutingStats:
    """Per token (averages): distinct destination ranks and nodes, seen from EP rank 0."""

    ranks: float  # ranks holding at least one of its experts (its own rank included)
    nodes: float  # nodes holding at least one (its own node included)
    remote_nodes: float  # ... other than its own node
    remote_ranks: float  # destination ranks on other nodes
    local_ranks: float  # destination ranks on its own node, itself excluded
    gpus_per_node: int  # G of the EP group (less than the cluster's when ep < G)


def routing_stats(cfg: ModelConfig, ep: int, gpus_per_node: int, tokens: int = 4096, seed: int = 0) -> RoutingStats:
    """Monte Carlo of where a balanced router sends tokens (see the module docstring)."""
    from leanmoe.model.moe import Router

    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if ep < 1 or e % ep:
        raise ValueError(f"ep={ep} must divide n_routed_experts={e}")
    g = min(gpus_per_node, ep)
    if ep % g:
        raise ValueError(f"ep={ep} must be a multiple of gpus_per_node={gpus_per_node} (whole nodes)")
    router = Router(cfg.replace(hidden_size=e))  # identity gate: logits are the random inputs
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
        logits = torch.randn(tokens, e, generator=torch.Generator().manual_seed(seed))
        idx, _, _ = router(logits)
    rank = idx // (e // ep)  # [T, K]
    node = rank // g
    hit_rank = torch.zeros(tokens, ep, dtype=torch.bool).scatter_(1, rank, True)
    hit_node = torch.zeros(tokens, ep // g, dtype=torch.bool).scatter_(1, node, True)
    ranks = hit_rank.sum(1).float()
    local_ranks = hit_rank[:, 1:g].sum(1).float()  # rank 0's node, rank 0 excluded
    return RoutingStats(ranks=ranks.mean().item(), nodes=hit_node.sum(1).float().mean().item(),
                        remote_nodes=hit_node[:, 1:].sum(1).float().mean().item(),
                        remote_ranks=hit_rank[:, g:].sum(1).float().mean().item(),
                        local_ranks=local_ranks.mean().item(), gpus_per_node=g)


def phase_time(st: RoutingStats, tokens: int, row_bytes: float, cluster: Cluster, transport: str) -> dict[str, float]:
    """One dispatch (or combine) of `tokens` tokens per GPU: bytes each GPU moves on NVLink and
    RDMA, and seconds. `row_bytes`: bytes of one token for one destination."""
    g = st.gpus_per_node
    if transport == "deepep":
        # every (token, destination rank) pair lands over NVLink unless the GPU the network
        # delivered it to (same local index as the sender) or the sender is the destination: 1/G
        nvl = tokens * st.ranks * (1 - 1 / g) * row_bytes
        rdma = tokens * st.remote_nodes * row_bytes
    elif transport == "leanmoe":
        nvl = tokens * st.local_ranks * row_bytes
        rdma = tokens * st.remote_ranks * row_bytes
    else:
        raise ValueError(f"transport must be 'deepep' or 'leanmoe', got {transport!r}")
    t_nvl = nvl / (cluster.nvlink_gbps * 1e9 * cluster.efficiency)
    t_rdma = rdma / (cluster.rdma_gbps * 1e9 * cluster.efficiency)
    return {"nvlink_bytes": nvl, "rdma_bytes": rdma, "seconds": max(t_nvl, t_rdma),
            "bound": "NVLink" if t_nvl >= t_rdma else "RDMA"}


def _row_bytes(hidden: int, k: int, fp8: bool, metadata: bool) -> float:
    data = hidden * (1 + 4 / 128) if fp8 else 2 * hidden
    return data + (8 * k if metadata else 0)


def step_estimate(cfg: ModelConfig, ep: int, tokens_per_rank: int, cluster: Cluster, *, micro_batches: int = 1,
                  fp8_dispatch: bool = True, stats: RoutingStats | None = None) -> dict[str, dict[str, float]]:
    """Per GPU and training step: dispatch/combine bytes and seconds for both transports.
    tokens_per_rank: tokens of one micro-batch on one rank (micro-batch x sequence length)."""
    st = stats or routing_stats(cfg, ep, cluster.gpus_per_node)
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    out = {}
    for transport in ("deepep", "leanmoe"):
        meta = transport == "leanmoe"
        phases = [("dispatch", _row_bytes(d, k, fp8_dispatch, meta)), ("combine", _row_bytes(d, k, False, False)),
                  ("combine (grad)", _row_bytes(d, k, False, False)),
                  ("dispatch (grad)", _row_bytes(d, k, False, meta))]
        per = [phase_time(st, tokens_per_rank, b, cluster, transport) for _, b in phases]
        scale = n_moe * micro_batches
        out[transport] = {
            "nvlink_bytes": scale * sum(p["nvlink_bytes"] for p in per),
            "rdma_bytes": scale * sum(p["rdma_bytes"] for p in per),
            "seconds": scale * sum(p["seconds"] for p in per),
            "dispatch_seconds_per_layer": per[0]["seconds"], "combine_seconds_per_layer": per[1]["seconds"],
            "bound": per[0]["bound"],
        }
    out["routing"] = {"ranks_per_token": st.ranks, "nodes_per_token": st.nodes, "moe_layers": n_moe}
    return out


def _deepep_config(ep: int, gpus_per_node: int) -> ModelConfig:
    """DeepEP's benchmark routing: top-8 of 256 (rounded to a multiple of ep), node groups."""
    nodes = max(1, ep // gpus_per_node)
    e = (256 // ep) * ep
    groups = dict(n_group=nodes, topk_group=min(4, nodes)) if nodes > 1 else dict(n_group=1, topk_group=1)
    return ModelConfig(hidden_size=7168, n_routed_experts=e, num_experts_per_tok=8, scoring_func="softmax",
                       norm_topk_prob=False, **groups)


def deepep_check(cluster: Cluster | None = None, tokens: int = 4096) -> list[dict]:
    """The model's prediction of DeepEP's published bandwidths (DEEPEP_H800), in its accounting."""
    cluster = cluster or Cluster()
    rows = []
    for ep, pub_d, pub_c, link in DEEPEP_H800:
        st = routing_stats(_deepep_config(ep, cluster.gpus_per_node), ep, cluster.gpus_per_node, tokens)
        row = {"ep": ep, "link": link}
        for what, fp8, published in (("dispatch", True, pub_d), ("combine", False, pub_c)):
            b = _row_bytes(7168, 8, fp8, metadata=False)
            t = phase_time(st, tokens, b, cluster, "deepep")
            logical = tokens * (st.ranks if link == "NVLink" else st.nodes) * b  # DeepEP's byte count
            row[what] = {"predicted_gbps": logical / t["seconds"] / 1e9, "published_gbps": published,
                         "seconds": t["seconds"], "bound": t["bound"]}
        rows.append(row)
    return rows


def _fmt_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m leanmoe.train.scale_model", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="deepseek-v3")
    src.add_argument("--config", help="an HF config.json (or a folder holding one)")
    p.add_argument("--ep", type=int, default=64)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbps", type=float, default=160.0)
    p.add_argument("--rdma-gbps", type=float, default=50.0)
    p.add_argument("--efficiency", type=float, default=0.85)
    p.add_argument("--tokens-per-rank", type=int, default=4096, help="tokens of one micro-batch on one GPU")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--bf16-dispatch", action="store_true", help="dispatch in bf16 instead of FP8")
    p.add_argument("--deepep-check", action="store_true", help="compare with DeepEP's published H800 figures")
    args = p.parse_args(argv)
    cluster = Cluster(args.gpus_per_node, args.nvlink_gbps, args.rdma_gbps, args.efficiency)
    if args.deepep_check:
        print("DeepEP normal kernels on H800 (DeepEP repository README): 4096 tokens/rank, hidden 7168, top-8 of "
              f"256, FP8 dispatch, bf16 combine. Model: NVLink {cluster.nvlink_gbps:g} GB/s, RDMA "
              f"{cluster.rdma_gbps:g} GB/s, efficiency {cluster.efficiency:g}.\n")
        print("| EP | link | dispatch predicted | dispatch published | error | combine predicted | "
              "combine published | error |")
        print("|---|---|---|---|---|---|---|---|")
        for r in deepep_check(cluster):
            d, c = r["dispatch"], r["combine"]
            print(f"| {r['ep']} | {r['link']} | {d['predicted_gbps']:.0f} GB/s | {d['published_gbps']:.0f} GB/s | "
                  f"{d['predicted_gbps'] / d['published_gbps'] - 1:+.0%} | {c['predicted_gbps']:.0f} GB/s | "
                  f"{c['published_gbps']:.0f} GB/s | {c['predicted_gbps'] / c['published_gbps'] - 1:+.0%} |")
        return 0
    cfg = ModelConfig.from_pretrained(args.config) if args.config else ModelConfig.from_preset(args.preset)
    est = step_estimate(cfg, args.ep, args.tokens_per_rank, cluster, micro_batches=args.micro_batches,
                        fp8_dispatch=not args.bf16_dispatch)
    r = est["routing"]
    nodes = math.ceil(args.ep / args.gpus_per_node)
    print(f"{args.preset if not args.config else args.config}: EP{args.ep} over {nodes} node(s) of "
          f"{args.gpus_per_node} GPUs, {args.tokens_per_rank} tokens/GPU/micro-batch x {args.micro_batches}, "
          f"{r['moe_layers']} MoE layers; a token visits {r['ranks_per_token']:.2f} ranks on "
          f"{r['nodes_per_token']:.2f} nodes; dispatch {'bf16' if args.bf16_dispatch else 'FP8'}, combine bf16\n")
    print("| transport | NVLink bytes/GPU/step | RDMA bytes/GPU/step | dispatch/layer | combine/layer | "
          "all-to-all time/step | bound by |")
    print("|---|---|---|---|---|---|---|")
    for name in ("deepep", "leanmoe"):
        e = est[name]
        print(f"| {name} | {_fmt_bytes(e['nvlink_bytes'])} | {_fmt_bytes(e['rdma_bytes'])} | "
              f"{e['dispatch_seconds_per_layer'] * 1e3:.2f} ms | {e['combine_seconds_per_layer'] * 1e3:.2f} ms | "
              f"{e['seconds']:.2f} s | {e['bound']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
