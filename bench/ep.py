"""Expert-parallel dispatch + combine (leanmoe.parallel.ep, all_to_all_single) against the naive
alternative a user would otherwise write: all-gather every token (and its routing) to every rank,
keep your own, and reduce-scatter the outputs back (dispatch_allgather / combine_allgather).

Spawns 2 and 4 CPU processes joined by gloo on 127.0.0.1 (one thread each). Per rank: N tokens of
hidden D in bf16, routed by leanmoe's Router on random logits. Two routings: plain top-K of E
experts, and group-limited with one group per rank and tokens limited to half the groups (as
DeepSeek-V3 limits a token to 4 of 8 nodes). Times are the slowest rank's median over the
repetitions of dispatch followed by combine (forward). Rows: token copies a rank sends to other
ranks (naive: every token to every other rank, and back).

    python bench/ep.py
    python bench/ep.py --tokens 4096 --hidden 2048 --ranks 2 4 --reps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: helpers shared with the tests
from tests.util import free_port  # noqa: E402


def _route(n: int, e: int, k: int, world: int, limited: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from leanmoe.config import ModelConfig
    from leanmoe.model.moe import Router

    groups = dict(n_group=world, topk_group=max(1, world // 2)) if limited else dict(n_group=1, topk_group=1)
    cfg = ModelConfig(hidden_size=e, n_routed_experts=e, num_experts_per_tok=k, **groups)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
        idx, w, _ = router(torch.randn(n, e, generator=torch.Generator().manual_seed(seed)))
    return idx, w


def _timed(fn, reps: int) -> float:
    import torch.distributed as dist

    times = []
    for i in range(reps + 2):  # two warm-up rounds
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank
        if i >= 2:
            times.append(float(t))
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from leanmoe.parallel.ep import ExpertParallel, combine_allgather, dispatch_allgather

    dist.init_process_group("gloo")
    group = dist.group.WORLD
    n, d, e, k = args["tokens"], args["hidden"], args["experts"], args["topk"]
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    rows = []
    for limited in (False, True):
        idx, w = _route(n, e, k, world, limited, seed=100 + rank)
        per = e // world
        in_rank = torch.zeros(n, world, dtype=torch.bool).scatter_(1, idx // per, True)
        sent = int(in_rank.sum()) - int(in_rank[:, rank].sum())  # token copies leaving this rank
        for fp8 in (False, True):
            ep = ExpertParallel(group, e, fp8_dispatch=fp8, combine_dtype=torch.bfloat16)

            def a2a():
                recv = ep.dispatch(x, idx, w)
                ep.combine(recv.x, recv.handle)

            t_ep = _timed(a2a, args["reps"])
            rows.append({"limited": limited, "fp8": fp8, "t_ep": t_ep, "sent": sent})

        def naive():
            recv = dispatch_allgather(x, idx, w, group, e)
            combine_allgather(recv.x, recv.handle, group)

        t_naive = _timed(naive, args["reps"])
        for r in rows[-2:]:
            r["t_naive"] = t_naive
    sent_all = [None] * world
    dist.all_gather_object(sent_all, [r["sent"] for r in rows])
    if rank == 0:
        for i, r in enumerate(rows):
            r["sent"] = sum(s[i] for s in sent_all) / world
        Path(out).write_text(json.dumps(rows))
    dist.barrier()  # nobody leaves while a peer is still talking to it
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"dispatch + combine, {args.tokens} tokens/rank, hidden {args.hidden} (bf16), top-{args.topk} of "
          f"{args.experts} experts, gloo on {os.cpu_count()} CPU cores, one thread per rank\n")
    print("| ranks | routing | dispatch payload | copies sent/rank: a2a vs all-gather | a2a (ms) | all-gather (ms) | "
          "speed-up |")
    print("|---|---|---|---|---|---|---|")
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows.json")
            mp.start_processes(_worker, args=(world, free_port(), vars(args), out), nprocs=world, join=True,
                               start_method="spawn")
            rows = json.loads(Path(out).read_text())
        for r in rows:
            routing = (f"group-limited ({max(1, world // 2)} of {world} ranks)" if r["limited"] else "plain top-k")
            naive_rows = (world - 1) * args.tokens
            payload = "FP8 + scales" if r["fp8"] else "bf16"
            print(f"| {world} | {routing} | {payload} | {r['sent']:.0f} vs {naive_rows} | "
                  f"{r['t_ep'] * 1e3:.1f} | {r['t_naive'] * 1e3:.1f} | {r['t_naive'] / r['t_ep']:.2f}x |")


if __name__ == "__main__":
    main()
