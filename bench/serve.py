"""Server load test: throughput, time to first token and time per output token under concurrency.

Starts `leanmoe serve` on a loopback port in a child process (so the load generator does not share
its interpreter), then sends --requests streaming completions, --concurrency at a time, each
asking for exactly --max-tokens tokens (ignore_eos). Reports tokens/s over the whole run, TTFT
(request sent -> first text) and TPOT ((last token - first token) / (tokens - 1)) at p50/p99, and
the number of failed requests (any error, non-200, or a stream not ending in [DONE]).

    python bench/serve.py                                  # tiny preset, random weights
    python bench/serve.py --checkpoint runs/mtp --speculative --concurrency 64 --requests 256  # --mtp-layers 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: helpers shared with the tests
from tests.util import free_port  # noqa: E402


def build_checkpoint(preset: str, folder: str) -> str:
    import torch

    from leanmoe import ModelConfig, Transformer, save_pretrained
    from leanmoe.data.tokenizer import train_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    save_pretrained(Transformer(cfg), folder)
    text = [open(__file__, encoding="utf-8").read()] * 4 + [open(json.__file__, encoding="utf-8").read()]
    train_tokenizer(text, vocab_size=min(cfg.vocab_size, 2048), show_progress=False).save(folder)
    return folder


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Until `url`/health answers 200; RuntimeError if the server exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    done = False
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                last = now
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    if tokens != max_tokens:
        raise RuntimeError(f"got {tokens} tokens, asked for {max_tokens}")
    return {"ttft": (first or last or t0) - t0,
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else float("nan"), "tokens": tokens}


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[dict], list[str], float]:
    sem = asyncio.Semaphore(concurrency)
    results, failures = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def task(p):
            async with sem:
                try:
                    results.append(await one(client, url, p, max_tokens))
                except Exception as e:  # noqa: BLE001 - counted and reported
                    failures.append(f"{type(e).__name__}: {e}")

        t0 = time.perf_counter()
        await asyncio.gather(*(task(p) for p in prompts))
        wall = time.perf_counter() - t0
    return results, failures, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--checkpoint")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--speculative", action="store_true", help="draft with the MTP module (for trained weights)")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint or build_checkpoint(args.preset, tmp.name)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = ("import sys; from leanmoe.infer.server import serve; "
            f"serve({ckpt!r}, port={port}, model_name='bench', log_level='warning', "
            f"max_num_seqs={max(args.concurrency, 1)}, speculative={args.speculative})")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        try:
            wait_ready(proc, url, 300)
        except RuntimeError as e:
            raise SystemExit(f"the server did not start: {e}") from None
        words = open(__file__, encoding="utf-8").read().split()
        prompts = [" ".join(words[i * 7 % 400: i * 7 % 400 + 24]) for i in range(args.requests)]
        asyncio.run(load(url, prompts[: min(8, len(prompts))], args.concurrency, 4))  # warm-up
        results, failures, wall = asyncio.run(load(url, prompts, args.concurrency, args.max_tokens))
    finally:
        proc.terminate()
        proc.wait(30)
        tmp.cleanup()

    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] * 1e3 for r in results]
    tpot = [r["tpot"] * 1e3 for r in results if r["tpot"] == r["tpot"]]
    print(f"# serve benchmark: {args.checkpoint or args.preset}, {args.requests} streaming requests, concurrency "
          f"{args.concurrency}, {args.max_tokens} tokens each, speculative={args.speculative}")
    print("\n| metric | value |\n|---|---:|")
    print(f"| requests ok / failed | {len(results)} / {len(failures)} |")
    print(f"| output throughput | {tokens / wall:,.0f} tokens/s |")
    print(f"| request throughput | {len(results) / wall:.2f} requests/s |")
    print(f"| TTFT p50 / p99 | {statistics.median(ttft):.0f} / {pct(ttft, 99):.0f} ms |" if ttft else "| TTFT | - |")
    print(f"| TPOT p50 / p99 | {statistics.median(tpot):.1f} / {pct(tpot, 99):.1f} ms |" if tpot else "| TPOT | - |")
    for f in failures[:5]:
        print("failure:", f)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
