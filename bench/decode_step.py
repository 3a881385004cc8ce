"""Eager vs compiled decode steps (EngineConfig.compile), alternating in one process.

Two engines over the same checkpoint, one eager and one compiled and warmed up as `leanmoe serve`
does, decode the same greedy requests at each batch size; rounds alternate which engine goes first.
Prints the median ms per decode step of each (min-max over rounds), the ratio, and whether the two
produced the same tokens.

    python bench/decode_step.py                      # bench/serve_vs_vllm.py's checkpoint
    python bench/decode_step.py --batches 1 16 --rounds 5 --steps 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_vs_vllm import CACHE, checkpoint  # noqa: E402


def decode_round(llm, prompts: list[str], steps: int) -> tuple[float, list[list[int]]]:
    """Prefill `prompts`, then time `steps` decode steps: (median seconds per step, tokens)."""
    from leanmoe.infer import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    ids = [llm.add_request(p, params) for p in prompts]
    llm.step()  # the prefill
    times, tokens = [], {}
    while llm.has_unfinished():
        t0 = time.perf_counter()
        outs = llm.step()
        times.append(time.perf_counter() - t0)
        for o in outs:
            if o.finished:
                tokens[o.request_id] = o.token_ids
    return statistics.median(times), [tokens[i] for i in ids]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from leanmoe.infer import LLM

    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint(CACHE / "serve_vs_vllm")
    engines = {}
    for mode in ("off", "on"):
        engines[mode] = LLM(ckpt, device="cpu", dtype="fp32", max_num_seqs=max(args.batches), speculative=False,
                            compile=mode)
    t0 = time.perf_counter()
    status = engines["on"].runner.compile_decode(warmup=True)
    print(f"# compiled engine: {status} ({time.perf_counter() - t0:.0f} s); {args.threads} threads, "
          f"{args.steps} decode steps a round, {args.rounds} rounds alternating")
    words = Path(__file__).read_text().split()
    print("\n| batch | eager ms/step | compiled ms/step | eager / compiled | same tokens |\n|---:|---:|---:|---:|---|")
    for b in args.batches:
        prompts = [" ".join(words[i * 5 % 200: i * 5 % 200 + 24]) for i in range(b)]
        ms: dict[str, list[float]] = {"off": [], "on": []}
        same = True
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            toks = {}
            for mode in order:
                t, toks[mode] = decode_round(engines[mode], prompts, args.steps)
                ms[mode].append(t * 1e3)
            same &= toks["off"] == toks["on"]
        e, c = statistics.median(ms["off"]), statistics.median(ms["on"])
        print(f"| {b} | {e:.2f} ({min(ms['off']):.2f}-{max(ms['off']):.2f}) | {c:.2f} ({min(ms['on']):.2f}-"
              f"{max(ms['on']):.2f}) | {e / c:.2f}x | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
