"""Why a served decode step is slower than an offline one: CPU contention or the interpreter lock?

The server runs the engine on a thread beside the HTTP event loop (leanmoe.infer.async_engine).
This script times offline batch-B decode steps (bench/serve_vs_vllm.py's checkpoint, 1 model
thread, as `leanmoe serve` uses on a 2-core machine) in turn:

  alone                       nothing else running
  busy process                another *process* spinning on a core (CPU contention only)
  busy process + thread       ... and a Python thread in this process busy --duty of the time
  thread                      the Python thread only (interpreter-lock contention only)
  alone again                 drift check

A slowdown with the thread but not with the process is the lock: the model thread takes it back
after every torch op, so Python work elsewhere in the process stalls it.

    python bench/serve_contention.py                 # batch 16, duty 15%
    python bench/serve_contention.py --batch 1 --duty 0.1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serve_vs_vllm import CACHE, checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=70, help="tokens generated per sequence in each phase")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    p.add_argument("--duty", type=float, default=0.15, help="share of each millisecond the Python thread is busy")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from leanmoe.infer import LLM, SamplingParams

    ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint(CACHE / "serve_vs_vllm")
    llm = LLM(ckpt, device="cpu", dtype="fp32", max_num_seqs=args.batch, speculative=False)
    words = Path(__file__).read_text().split()
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    def phase(label: str) -> None:
        for i in range(args.batch):
            llm.add_request(" ".join(words[i * 5 % 200: i * 5 % 200 + 24]), params, stream=True)
        for _ in range(4):  # prefill and warm-up
            llm.step()
        steps = []
        while llm.has_unfinished():
            t0 = time.perf_counter()
            llm.step()
            steps.append(time.perf_counter() - t0)
        print(f"| {label} | {statistics.median(steps) * 1e3:.2f} | {min(steps) * 1e3:.2f} |", flush=True)

    stop = threading.Event()

    def python_work() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.duty * 1e-3:
                sum(range(100))
            time.sleep((1 - args.duty) * 1e-3)

    print(f"decode steps at batch {args.batch}, {args.threads} model thread(s), Python thread busy {args.duty:.0%}\n")
    print("| condition | median ms/step | min ms/step |\n|---|---:|---:|")
    phase("alone")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        phase("busy process on another core")
        worker = threading.Thread(target=python_work, daemon=True)
        worker.start()
        phase("busy process + Python thread")
    finally:
        burner.kill()
        burner.wait()
    phase("Python thread only")
    stop.set()
    worker.join()
    phase("alone again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
