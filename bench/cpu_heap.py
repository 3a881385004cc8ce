"""What keeping freed memory (leanmoe.train.memory.retain_cpu_heap, the trainer's CPU default) buys
a CPU training step, against glibc's default allocator (LEANMOE_CPU_HEAP=system).

Each measurement is a fresh worker process (an allocator setting cannot be undone in a process):
it builds the preset (or its dense twin, bench/moe_vs_dense.py's), runs full training steps on
random tokens under the trainer's autocast (forward, backward, clipping, AdamW, router-bias
update) and reports the median step time, the page faults per step and the peak resident memory.
Workers for the two settings alternate, round after round, so machine drift hits both alike.

    python bench/cpu_heap.py                          # tiny MoE and dense twin, bf16, 3 rounds
    python bench/cpu_heap.py --models MoE --rounds 5 --steps 10 --dtype fp32

Time it on a quiet machine: it says when the load average was high before it started (its own
workers load both cores while they run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("system", "retain")


def training_step(model: str = "MoE", dtype: str = "bf16", batch: int = 16, seq_len: int = 256):
    """A full training step of `tiny` (model "MoE") or its dense twin on fixed random tokens, as the
    trainer takes it: forward under its autocast, backward, clipping, AdamW, router-bias update.
    Returns the step function (no arguments)."""
    import torch

    from leanmoe import ModelConfig, Transformer
    from leanmoe.train.optim import build_optimizer

    sys.path.insert(0, str(Path(__file__).parent))
    from moe_vs_dense import dense_equivalent

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    if model == "dense":
        cfg = dense_equivalent(cfg)
    m = Transformer(cfg).train()
    opt = build_optimizer(m, 1e-3)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = m.compute_loss(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.update_router_bias()

    return step


def worker(model: str, dtype: str, steps: int, batch: int, seq_len: int) -> dict:
    """Runs in a fresh process whose LEANMOE_CPU_HEAP is already set."""
    from leanmoe.train.memory import retain_cpu_heap

    heap = retain_cpu_heap()
    step = training_step(model, dtype, batch, seq_len)

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for _ in range(3):  # warm-up: oneDNN's kernels for these shapes, the heap's first growth
        step()
    times, f0 = [], faults()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"heap": heap, "step_s": statistics.median(times), "faults_per_step": (faults() - f0) / steps,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(setting: str, model: str, args) -> dict:
    env = dict(os.environ, LEANMOE_CPU_HEAP=setting)
    cmd = [sys.executable, __file__, "--worker", model, "--dtype", args.dtype, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=("MoE", "dense"), default=["MoE", "dense"])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--rounds", type=int, default=3, help="worker pairs per model (default 3)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per worker (default 8)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--worker", choices=("MoE", "dense"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.steps, args.batch_size, args.seq_len)))
        return
    if os.getloadavg()[0] > (os.cpu_count() or 1) / 2:
        print(f"warning: load average {os.getloadavg()[0]:.2f} before timing; the machine is not quiet")
    print(f"tiny, {args.dtype}, batch {args.batch_size} x {args.seq_len}, {args.rounds} rounds of {args.steps} steps")
    print(f"{'model':6s} {'setting':7s} {'step ms (each round)':28s} {'median':>7s} {'faults/step':>12s} {'max RSS MB':>10s}")
    for model in args.models:
        res = {s: [] for s in SETTINGS}
        for _ in range(args.rounds):
            for s in SETTINGS:
                res[s].append(measure(s, model, args))
        for s in SETTINGS:
            steps = [r["step_s"] * 1e3 for r in res[s]]
            print(f"{model:6s} {s:7s} {' '.join(f'{t:.0f}' for t in steps):28s} {statistics.median(steps):7.0f} "
                  f"{statistics.median(r['faults_per_step'] for r in res[s]):12,.0f} "
                  f"{max(r['max_rss_mb'] for r in res[s]):10,.0f}")
        ratio = [a["step_s"] / b["step_s"] for a, b in zip(res["system"], res["retain"])]
        print(f"{model:6s} retain speed-up: {statistics.median(ratio):.3f}x "
              f"(per round {', '.join(f'{r:.3f}' for r in ratio)}); heap: {res['retain'][0]['heap']}")


if __name__ == "__main__":
    main()
