"""Where a decode step's time goes: one engine step at batch B, split into scheduling (plain Python),
the model's forward pass, sampling, and appending/detokenising the outputs, then the forward's
top torch ops from `torch.profiler`.

The split wraps the engine's own methods with timers (CPU execution is synchronous, so wall time
per call is the work of the call); what is not in any wrapped call is reported as the rest of the
step. The HTTP/SSE side is measured by bench/serve_vs_vllm.py (TPOT served vs offline).

    python bench/profile_decode.py                       # bench/serve_vs_vllm.py's checkpoint, batch 16
    python bench/profile_decode.py --checkpoint runs/x --batch 16 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_vs_vllm import CACHE, checkpoint  # noqa: E402


def timed(obj, name: str, bucket: dict[str, list[float]], label: str) -> None:
    real = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            bucket[label].append(time.perf_counter() - t0)

    setattr(obj, name, wrapper)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="EngineConfig.compile (auto: torch.compile for fp32 on a CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from leanmoe.infer import LLM, SamplingParams

    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint(CACHE / "serve_vs_vllm")
    llm = LLM(ckpt, device="cpu", dtype=args.dtype, max_num_seqs=args.batch, speculative=False, compile=args.compile)
    if llm.config.compile_decode:  # as `leanmoe serve` does before it takes requests
        print(f"# decode step: {llm.runner.compile_decode(warmup=True)}")
    words = Path(__file__).read_text().split()
    prompts = [" ".join(words[i * 5 % 200: i * 5 % 200 + 24]) for i in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    for pr in prompts:
        llm.add_request(pr, params, stream=True)
    t0 = time.perf_counter()
    for _ in range(4):  # prefill and a few warm decode steps
        llm.step()
    print(f"# prefill + 3 warm-up steps {time.perf_counter() - t0:.1f} s")
    bucket: dict[str, list[float]] = defaultdict(list)
    timed(llm.scheduler, "schedule", bucket, "schedule (Python)")
    timed(llm.runner, "_decode_hidden", bucket, "model: layers")
    timed(llm.runner.model.lm_head, "forward", bucket, "model: lm_head")
    timed(llm.runner.sampler, "sample", bucket, "sample")
    timed(llm, "_append", bucket, "append + stop checks")
    timed(llm, "_output", bucket, "outputs + detokenise")
    timed(llm.scheduler, "finish", bucket, "finish (Python)")
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        llm.step()
        steps.append(time.perf_counter() - t0)
    total = sum(steps)
    print(f"# decode step at batch {args.batch}, {args.steps} steps, {args.dtype}, {args.threads} threads, "
          f"{'compiled' if llm.runner._compiled_hidden is not None else 'eager'}: "
          f"median {statistics.median(steps) * 1e3:.2f} ms/step, {args.batch / statistics.median(steps):,.0f} tok/s\n")
    print("| part | ms/step | share |\n|---|---:|---:|")
    accounted = 0.0
    for label, xs in bucket.items():
        accounted += sum(xs)
        print(f"| {label} | {sum(xs) / args.steps * 1e3:.2f} | {sum(xs) / total:.1%} |")
    rest = total - accounted
    print(f"| rest of the step (runner inputs, metadata, host syncs) | {rest / args.steps * 1e3:.2f} | {rest / total:.1%} |")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            llm.step()
    print("\ntop ops of 8 decode steps (self CPU time):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
