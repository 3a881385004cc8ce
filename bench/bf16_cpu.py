"""Does bf16 autocast on this CPU track fp32 training, and how much faster is it?

Trains the MoE preset and its dense twin (bench/moe_vs_dense.py's) for the same number of steps
on the same data, seed and batches, once in fp32 and once under bf16 autocast, and prints each
run's tokens/s and its validation bits/byte at every evaluation, with bf16's relative difference
from fp32. The trainer makes the choice `--dtype auto` takes on a CPU from what this measured.

    python bench/bf16_cpu.py                        # tiny MoE and dense twin, 150 steps, stdlib
    python bench/bf16_cpu.py --models MoE --steps 60

Runs one at a time and says when the machine was not quiet (1-minute load average above half
the cores before a run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_vs_dense import (BUSY, MODELS, corpus_spec, corpus_tokenizer, dense_equivalent,  # noqa: E402
                          machine_info, read_curve, settle)

from leanmoe import ModelConfig  # noqa: E402
from leanmoe.train import TrainConfig, Trainer  # noqa: E402

DTYPES = ("fp32", "bf16")


def run(args, model: str, cfg_path: Path, tokenizer: Path, dtype: str) -> dict:
    load = settle(args.settle)
    print(f"[run] {model} {dtype}; load average {load[0]:.2f}", flush=True)
    run_dir = args.out / model / dtype
    tc = TrainConfig(config=str(cfg_path), data=corpus_spec(args.corpus), tokenizer=str(tokenizer), out=str(run_dir),
                     max_steps=args.steps, seed=args.seed, dtype=dtype, eval_interval=args.eval_interval,
                     eval_batches=args.eval_batches, sample_tokens=0, save_interval=10**9, keep_last=1,
                     device="cpu", progress=not args.no_progress)
    trainer = Trainer(tc)
    res = trainer.train()
    trainer.close()
    return {"model": model, "dtype": dtype, "tokens_per_second": res.tokens_per_second, "val_bpb": res.val_bpb,
            "curve": read_curve(run_dir), "load_before": load, "busy": load[0] > BUSY}


def relative_diffs(ref: dict, run_: dict) -> list[float]:
    """(run - ref) / ref of the validation bits/byte at each evaluation both runs made."""
    return [(b[3] - a[3]) / a[3] for a, b in zip(ref["curve"], run_["curve"])]


def report(runs: list[dict]) -> str:
    lines = ["| model | dtype | tokens/s | bf16 / fp32 speed | final val bpb | bf16 - fp32 (relative), per evaluation |",
             "|---|---|---:|---:|---:|---|"]
    by = {(r["model"], r["dtype"]): r for r in runs}
    for (model, dtype), r in by.items():
        ref = by.get((model, "fp32"))
        speed, diffs = "", ""
        if dtype == "bf16" and ref:
            speed = f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x"
            diffs = ", ".join(f"{d:+.2%}" for d in relative_diffs(ref, r))
        busy = " (machine busy)" if r["busy"] else ""
        lines.append(f"| {model} | {dtype}{busy} | {r['tokens_per_second']:,.0f} | {speed} | {r['val_bpb']:.4f} | {diffs} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default="stdlib", help="stdlib | torch | a path (bench/moe_vs_dense.py's corpora)")
    ap.add_argument("--eval-interval", type=int, default=30)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--settle", type=float, default=90, help="seconds to wait at most for a quiet machine per run")
    ap.add_argument("--out", type=Path, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bf16_cpu-"))
    args.out.mkdir(parents=True, exist_ok=True)
    moe = ModelConfig.from_preset(args.preset)
    configs = {"MoE": moe, "dense": dense_equivalent(moe)}
    tokenizer = corpus_tokenizer(args.corpus, moe, args.out)
    runs = []
    for model in args.models:
        cfg_path = args.out / f"{model}.config.json"
        configs[model].save(cfg_path)
        for dtype in DTYPES:
            runs.append(run(args, model, cfg_path, tokenizer, dtype))
    info = machine_info()
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    text = (f"{dt.date.today()}, {info['machine']}, {os.cpu_count()} cores, torch {info['torch']}, commit "
            f"{info['git_commit']}: `{command}` ({args.steps} steps, seed {args.seed}, {args.corpus})\n\n" + report(runs))
    by = {(r["model"], r["dtype"]): r for r in runs}
    spread = [abs(d) for m in args.models for d in relative_diffs(by[m, "fp32"], by[m, "bf16"])]
    if spread:
        text += f"\n\nlargest |bf16 - fp32| / fp32 at an evaluation: {max(spread):.2%} (mean {statistics.mean(spread):.2%})"
    (args.out / "results.json").write_text(json.dumps({"meta": {**info, "command": command}, "runs": runs}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    main()
