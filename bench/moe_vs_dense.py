"""The MoE vs its dense twin at equal wall-clock: the study of issue #14.

Trains the MoE preset (default `tiny`) and its dense twin (`dense_equivalent`: same trunk, every MLP
a dense SwiGLU sized to the same activated parameters) for equal wall-clock budgets, over seeds and
corpora. Per corpus both models share one tokenizer (trained once, passed as TrainConfig.tokenizer);
per seed the data order; always the batch, learning rate and validation windows. The two runs of a
(corpus, budget, seed) pair share the machine in turns of --interleave steps, each turn going to
the run whose clock is behind; a run's clock (its budget and learning-rate schedule) counts only
its own turns, so a change in the host's speed hits both alike. --interleave 0 runs them back to
back instead, the order flipping every pair.
Corpora: `stdlib` (the Python standard library, leanmoe's default), `torch` (the installed torch
package's .py files, ~46 MB: present wherever leanmoe runs, and other code than the stdlib), or any
--data spec (folder, glob, file.jsonl, hf:NAME).

--out gets runs/<corpus>/<budget>/seed<S>/<model>/ (Trainer run folders; metrics.jsonl holds step,
tokens, elapsed, val_bpb every --eval-interval steps, the clock including those evaluations),
results.json and results.md; the plot goes to --plot. Each run first waits (up to --settle s) for
the 1-minute load average to fall below 0.5 per core; a run starting above it, or ending above our
threads + 0.5 per core, is flagged in the output and results.json. After its clock stops each
final model is evaluated again on up to --final-eval-batches validation batches (an 8-batch
evaluation varies by ~0.02 bits/byte between runs), reported beside the table.

    python bench/moe_vs_dense.py --out runs/study                          # 10m and 30m, seeds 0-2, 2 corpora
    python bench/moe_vs_dense.py --out runs/study --resume-study           # continue it after a stop
    python bench/moe_vs_dense.py --budgets 15s --seeds 0 --corpora stdlib  # a smoke run
    python bench/moe_vs_dense.py --set num_nextn_predict_layers=0          # the preset without MTP
    python bench/moe_vs_dense.py --interleave 0                            # each pair back to back
    python bench/moe_vs_dense.py --from-results a/results.json b/results.json --out merged --plot m.png
                                                                           # one table and plot from two studies

--equal-steps also trains the MoE, after each pair, for the dense twin's step count: the margin the
MoE would reach if its layers cost no more time than the dense MLP, the most any speed-up can buy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from itertools import groupby
from pathlib import Path
from statistics import mean, median

import torch

from leanmoe import ModelConfig
from leanmoe.train import TrainConfig, Trainer
from leanmoe.train.config import parse_duration

REPO = Path(__file__).resolve().parents[1]
MODELS = ("MoE", "dense")
EQUAL = "MoE@dense-steps"  # --equal-steps: the MoE trained for as many steps as the dense twin took
# the only options --from-results reads; it refuses every other one given (it trains nothing, so they would be ignored)
MERGE_FLAGS = ("from_results", "out", "plot")
BUSY = 0.5 * (os.cpu_count() or 1)  # a 1-minute load average above this: the machine is not quiet


def dense_equivalent(cfg: ModelConfig, multiple: int = 8) -> ModelConfig:
    """Same trunk, no MoE: every layer's MLP width chosen so activated parameters match `cfg`."""
    d = cfg.hidden_size
    ffn_active = 0
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            ffn_active += (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * d * cfg.moe_intermediate_size
            ffn_active += cfg.n_routed_experts * d  # router
        else:
            ffn_active += 3 * d * cfg.intermediate_size
    width = round(ffn_active / (3 * d * cfg.num_hidden_layers) / multiple) * multiple
    return cfg.replace(intermediate_size=width, first_k_dense_replace=cfg.num_hidden_layers + cfg.num_nextn_predict_layers)


# ---------------------------------------------------------------------------- plain helpers (tested)
def parse_overrides(items: list[str]) -> dict:
    """--set's KEY=VALUE items as ModelConfig field overrides; VALUE is JSON (a bare word is a string)."""
    import dataclasses

    fields, out = {f.name for f in dataclasses.fields(ModelConfig)}, {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY a ModelConfig field "
                             f"(e.g. num_nextn_predict_layers=0)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def corpus_spec(name: str) -> list[str] | None:
    """--data specs for a corpus name: None for `stdlib`, torch's .py files for `torch`, else [name]."""
    return {"stdlib": None, "torch": [str(Path(torch.__file__).parent / "**" / "*.py")]}.get(name, [name])


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "corpus"


def run_plan(corpora: list[str], budgets: list[str], seeds: list[int]) -> list[tuple[str, str, int, str]]:
    """(corpus, budget, seed, model) in run order: pairs back to back, the order flipping every pair."""
    pairs = [(c, b, s) for c in corpora for b in budgets for s in seeds]
    return [(*pair, m) for i, pair in enumerate(pairs) for m in (MODELS if i % 2 == 0 else MODELS[::-1])]


def target_margin(budget_s: float) -> float:
    """Issue #14's target: MoE lower by 0.03 bits/byte at 10 minutes, 0.05 at 30 (and above)."""
    return 0.05 if budget_s >= 1800 else 0.03


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First token count at which a (tokens, val_bpb) curve reaches `target`, linearly interpolated
    between evaluations; None if it never does. A curve already below at its first point gives that
    point's tokens (an upper bound)."""
    prev = None
    for tokens, bpb in curve:
        if bpb <= target:
            if prev is None:
                return float(tokens)
            (t0, b0) = prev
            return t0 + (tokens - t0) * (b0 - target) / (b0 - bpb)
        prev = (tokens, bpb)
    return None


def multiplier_text(moe: dict, dense_same: dict, dense_longer: list[dict]) -> str:
    """How many tokens the dense twin needs to reach the MoE's final val bpb, as a multiple of the
    MoE's tokens. Not reached in its own budget: a lower bound (its final tokens); a longer dense run
    that does reach it gives an upper bound (its schedule had not annealed there yet)."""
    curve = [(p[1], p[3]) for p in dense_same["curve"]]
    t = tokens_to_reach(curve, moe["val_bpb"])
    if t is not None:  # already there at its first evaluation: at most that many
        return f"{'<=' if curve[0][1] <= moe['val_bpb'] else ''}{t / moe['tokens']:.2f}x"
    text = f"not reached (>{dense_same['tokens'] / moe['tokens']:.2f}x"
    for r in sorted(dense_longer, key=lambda r: r["budget_s"]):
        t = tokens_to_reach([(p[1], p[3]) for p in r["curve"]], moe["val_bpb"])
        if t is not None:
            return text + f", <={t / moe['tokens']:.2f}x by the {r['budget']} run)"
    return text + ")"


def panel(run: dict) -> tuple[str, str, str]:
    """What a table row and a plot panel average over seeds: corpus, budget and the autocast dtype
    (bf16 and fp32 runs train at different speeds, and on different machines)."""
    return run["corpus"], run["budget"], run.get("dtype", "?")  # "?": a record from before the key


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (corpus, budget, dtype) over the seeds where both models finished: runs merged
    from another machine in another precision are not averaged with these."""
    rows = []
    for corpus, budget, dtype in dict.fromkeys(map(panel, runs)):
        by = {(r["corpus"], r["budget"], r["seed"], r["model"]): r for r in runs if panel(r)[2] == dtype}
        seeds = sorted({s for (c, b, s, m) in by if (c, b) == (corpus, budget)})
        pairs = [(s, by[corpus, budget, s, "MoE"], by[corpus, budget, s, "dense"]) for s in seeds
                 if (corpus, budget, s, "MoE") in by and (corpus, budget, s, "dense") in by]
        if not pairs:
            continue
        moe, dense = [p[1] for p in pairs], [p[2] for p in pairs]
        need, margins = target_margin(moe[0]["budget_s"]), [d["val_bpb"] - m["val_bpb"] for _, m, d in pairs]
        longer = {s: [r for (c, _, s2, m), r in by.items() if (c, s2, m) == (corpus, s, "dense")
                      and r["budget_s"] > moe[0]["budget_s"]] for s, _, _ in pairs}
        equal = [[s, d["val_bpb"] - by[corpus, budget, s, EQUAL]["val_bpb"]] for s, _, d in pairs
                 if (corpus, budget, s, EQUAL) in by]  # [seed, margin]
        rows.append({"corpus": corpus, "budget": budget, "dtype": dtype, "seeds": [p[0] for p in pairs],
                     "equal_step_margins": equal,
                     "moe_bpb": [m["val_bpb"] for m in moe], "dense_bpb": [d["val_bpb"] for d in dense],
                     "margins": margins, "moe_tps": mean(m["tokens_per_second"] for m in moe),
                     "dense_tps": mean(d["tokens_per_second"] for d in dense),
                     "multipliers": [multiplier_text(m, d, longer[s]) for s, m, d in pairs],
                     "target": need, "target_met": all(x >= need for x in margins)})
        if all("final_eval" in r for r in [*moe, *dense]):  # runs before --final-eval-batches have none
            final = [d["final_eval"]["val_bpb"] - m["final_eval"]["val_bpb"] for _, m, d in pairs]
            rows[-1].update(final_margins=final, final_tokens=min(r["final_eval"]["tokens"] for r in [*moe, *dense]),
                            final_target_met=all(x >= need for x in final))
    return rows


def markdown(rows: list[dict], split: dict | None, warnings: list[str]) -> str:
    spread = lambda xs: f"{mean(xs):.4f} ({min(xs):.4f}-{max(xs):.4f})"
    out = [("| corpus | budget | dtype | seeds | MoE val bpb mean (min-max) | dense val bpb mean (min-max) | "
            "dense - MoE per seed | MoE tok/s | dense tok/s | dense tokens to reach MoE's bpb | target |"), "|" + "---|" * 11]
    for r in rows:
        met = f"{'yes' if r['target_met'] else 'no'} (>= {r['target']} in every seed)"
        out.append(f"| {r['corpus']} | {r['budget']} | {r.get('dtype', '?')} | {len(r['seeds'])} | "
                   f"{spread(r['moe_bpb'])} | "
                   f"{spread(r['dense_bpb'])} | {' / '.join(f'{x:+.4f}' for x in r['margins'])} | "
                   f"{r['moe_tps']:,.0f} | {r['dense_tps']:,.0f} | {' / '.join(r['multipliers'])} | {met} |")
    finals = [r for r in rows if r.get("final_margins")]
    if finals:
        out += ["", "Each final model evaluated again after its budget on more of the validation split (the same "
                "windows for both models; the table's numbers are the trainer's last evaluation, the windows its "
                "curve used), dense - MoE: " + "; ".join(
                    f"{r['corpus']} {r['budget']} {r.get('dtype', '?')} ({r['final_tokens']:,} tokens) "
                    + " / ".join(f"{x:+.4f}" for x in r["final_margins"])
                    + f", target {'met' if r['final_target_met'] else 'not met'}" for r in finals) + "."]
    bounds = [r for r in rows if r.get("equal_step_margins")]
    if bounds:
        out += ["", "The MoE trained for as many steps as the dense twin took in its budget (`--equal-steps`: what "
                "an MoE layer costing no more than the dense MLP would reach, the most a faster MoE can buy), "
                "dense - MoE: " + "; ".join(f"{r['corpus']} {r['budget']} {r.get('dtype', '?')} " + ", ".join(
                    f"seed {s} {x:+.4f}" for s, x in r["equal_step_margins"]) for r in bounds) + "."]
    if split:
        out += ["", (f"Step-time split, ms per optimizer step (batch {split['batch']}), from isolated-component "
                     "timing: each component's forward + backward run alone on the inputs it received in one "
                     "training forward, median of repeats, summed over layers; rest = the trainer's median full "
                     "step - the components (embedding, norms, LM head and loss, MTP projection, optimizer)."), "",
                "| component | MoE ms | MoE % | dense ms | dense % |", "|---|---:|---:|---:|---:|"]
        for name in [*split["MoE"]["parts"], *(n for n in split["dense"]["parts"] if n not in split["MoE"]["parts"])]:
            cells = []
            for m in MODELS:
                ms, full = split[m]["parts"].get(name), split[m]["full_step_ms"]
                cells += [f"{ms:.1f}", f"{100 * ms / full:.0f}%"] if ms is not None else ["", ""]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("| full step | " + " | ".join(f"{split[m]['full_step_ms']:.1f} | 100%" for m in MODELS) + " |")
        out += ["", split_note(split)]
    if warnings:
        out += ["", "**The machine was not quiet:**", *(f"- {w}" for w in warnings)]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- machine state
def settle(max_wait: float) -> list[float]:
    """Wait (up to max_wait s) until the 1-minute load average is below 0.5 per core: the load
    averages (1, 5, 15 min) when the run starts."""
    t0 = time.monotonic()
    while os.getloadavg()[0] > BUSY and time.monotonic() - t0 < max_wait:
        time.sleep(5)
    return [round(x, 2) for x in os.getloadavg()]


def load_warnings(what: str, before: list[float], after: list[float]) -> list[str]:
    """Busy before: above 0.5 per core. Busy during: at the end above our threads + 0.5 per core."""
    warns = []
    if before[0] > BUSY:
        warns.append(f"{what}: load average {before[0]:.2f} at the start (> {BUSY:.1f}, 0.5 per core)")
    if after[0] > torch.get_num_threads() + BUSY:
        warns.append(f"{what}: load average {after[0]:.2f} at the end (> our {torch.get_num_threads()} threads + "
                     f"{BUSY:.1f}): something else ran")
    for w in warns:
        print(f"WARNING: {w}", flush=True)
    return warns


def machine_info() -> dict:
    from leanmoe.train.report import device_name

    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False)

    commit = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    dirty = git("diff", "--quiet", "HEAD").returncode == 1
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {"git_commit": commit + ("-dirty" if dirty else ""), "machine": device_name(dev),
            "platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------- runs
def corpus_tokenizer(name: str, cfg: ModelConfig, out: Path) -> Path:
    """The corpus's tokenizer, trained once on its training documents (as a Trainer would) and
    reused by every run on it."""
    from leanmoe.data.sources import iter_documents, resolve_sources
    from leanmoe.data.tokenizer import train_tokenizer

    folder = out / "tokenizers" / slug(name)
    if not (folder / "tokenizer.json").is_file():
        print(f"training the {cfg.vocab_size}-token tokenizer for {name}", flush=True)
        docs = iter_documents(resolve_sources(corpus_spec(name)), "train", TrainConfig.val_fraction)
        train_tokenizer((d.text for d in docs), cfg.vocab_size, show_progress=False).save(folder)
    return folder / "tokenizer.json"


def expert_lr_scale(args, model: str) -> float:
    """The routed experts' learning-rate multiple for this run: --expert-lr-scale for the MoE runs
    (the dense twin has no routed experts)."""
    return 1.0 if model == "dense" else args.expert_lr_scale


def read_curve(run_dir: Path) -> list[list[float]]:
    """[step, tokens, elapsed, val_bpb] at every evaluation, from metrics.jsonl."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["step"], r["tokens"], r["elapsed"], r["val_bpb"]] for r in recs if r.get("val_bpb") is not None]


def run_folder(args, corpus: str, budget: str, seed: int, model: str) -> Path:
    return args.out / "runs" / slug(corpus) / slug(budget) / f"seed{seed}" / model


def finished_run(args, run_dir: Path, model: str, max_steps: int | None = None,
                 warmup_steps: int | None = None) -> dict | None:
    """The record of a run --resume-study can keep: finished, with this study's settings."""
    done = run_dir / "study_result.json"
    if not (done.is_file() and args.resume_study):
        return None
    rec = json.loads(done.read_text())
    same = (rec.get("expert_lr_scale", 1.0) == expert_lr_scale(args, model)
            and rec.get("interleave", 0) == (0 if max_steps is not None else args.interleave))
    if same and (max_steps is None or (rec["steps"], rec.get("warmup_steps")) == (max_steps, warmup_steps)):
        print(f"[skip] {rec['corpus']} {rec['budget']} seed {rec['seed']} {model}: finished in {run_dir}", flush=True)
        return rec
    return None


def make_trainer(args, corpus: str, budget: str, seed: int, model: str, cfg_path: Path, tokenizer: Path,
                 max_steps: int | None = None, warmup_steps: int | None = None) -> Trainer:
    """A Trainer for one run of the study, in a fresh run folder (an unfinished run starts over: its
    clock cannot be resumed fairly)."""
    run_dir = run_folder(args, corpus, budget, seed, model)
    shutil.rmtree(run_dir, ignore_errors=True)
    tc = TrainConfig(config=str(cfg_path), data=corpus_spec(corpus), tokenizer=str(tokenizer), out=str(run_dir),
                     time_budget=None if max_steps is not None else parse_duration(budget), max_steps=max_steps,
                     warmup_steps=warmup_steps, seed=seed, seq_len=args.seq_len, batch_size=args.batch_size,
                     eval_interval=args.eval_interval, eval_batches=args.eval_batches, sample_tokens=0,
                     save_interval=10**9, keep_last=1, device=args.device, dtype=args.dtype,
                     progress=not args.no_progress, expert_lr_scale=expert_lr_scale(args, model))
    return Trainer(tc)


def record(args, corpus: str, budget: str, seed: int, model: str, trainer: Trainer, res, info: dict,
           load_before: list[float], load_after: list[float], warns: list[str], **extra) -> dict:
    """A finished run's study_result.json (its final evaluation run here, outside its clock)."""
    if res.interrupted:
        sys.exit(f"interrupted during {trainer.run_dir}; continue with --resume-study --out {args.out}")
    final = final_evaluation(trainer, args.final_eval_batches) if args.final_eval_batches else None
    trainer.close()
    rec = {"corpus": corpus, "budget": budget, "budget_s": parse_duration(budget), "seed": seed, "model": model,
           "steps": res.steps, "tokens": res.tokens, "tokens_per_second": res.tokens_per_second,
           "elapsed": res.elapsed, "val_bpb": res.val_bpb, "val_loss": res.val_loss, "interrupted": res.interrupted,
           "batch": [trainer.tc.batch_size, trainer.tc.seq_len], "lr": trainer.tc.lr,
           "warmup_steps": trainer.tc.warmup_steps, "dtype": trainer.tc.dtype,
           "expert_lr_scale": trainer.tc.expert_lr_scale, **extra,
           "load_before": load_before, "load_after": load_after, "warnings": warns, "run_dir": str(trainer.run_dir),
           "date": dt.datetime.now().isoformat(timespec="seconds"), **info, "curve": read_curve(trainer.run_dir)}
    if final is not None:
        rec["final_eval"] = final
    if not args.keep_checkpoints:
        shutil.rmtree(trainer.run_dir / "checkpoints", ignore_errors=True)
    (trainer.run_dir / "study_result.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def run_one(args, corpus: str, budget: str, seed: int, model: str, cfg_path: Path, tokenizer: Path,
            info: dict, max_steps: int | None = None, warmup_steps: int | None = None) -> dict:
    """One training run alone: `budget` of wall-clock, or max_steps steps (then no time limit; the
    learning-rate schedule has the same shape, over steps instead of seconds, given the timed
    run's warmup_steps)."""
    rec = finished_run(args, run_folder(args, corpus, budget, seed, model), model, max_steps, warmup_steps)
    if rec is not None:
        return rec
    trainer = make_trainer(args, corpus, budget, seed, model, cfg_path, tokenizer, max_steps, warmup_steps)
    load_before = settle(args.settle)
    print(f"[run] {corpus} {budget} seed {seed} {model}; load average {load_before[0]:.2f}", flush=True)
    res = trainer.train()
    load_after = [round(x, 2) for x in os.getloadavg()]
    warns = load_warnings(f"{corpus} {budget} seed {seed} {model}", load_before, load_after)
    return record(args, corpus, budget, seed, model, trainer, res, info, load_before, load_after, warns,
                  interleave=0)


def run_turns(args, corpus: str, budget: str, seed: int, models: list[str], tokenizer: Path, info: dict) -> list[dict]:
    """A pair sharing the machine in turns of --interleave steps: each turn goes to the run whose
    clock is behind (ties to the first of `models`), and each run's clock counts only its turns,
    so both runs see the same host. A pair is kept or rerun whole (its clocks ran together)."""
    kept = [finished_run(args, run_folder(args, corpus, budget, seed, m), m) for m in models]
    if all(kept):
        return kept
    trainers = {m: make_trainer(args, corpus, budget, seed, m, args.out / f"{m}.config.json", tokenizer) for m in models}
    load_before = settle(args.settle)
    print(f"[run] {corpus} {budget} seed {seed} {' and '.join(models)} in turns of {args.interleave} steps; "
          f"load average {load_before[0]:.2f}", flush=True)
    for t in trainers.values():
        t.setup()
    results, turns = {}, dict.fromkeys(models, 0)
    while len(results) < len(models):
        model = min((m for m in models if m not in results), key=lambda m: trainers[m].state.elapsed)
        res = trainers[model].train(stop_after=args.interleave)
        turns[model] += 1
        if res.interrupted:  # Ctrl-C or a signal: the other run stops too
            sys.exit(f"interrupted during {trainers[model].run_dir}; continue with --resume-study --out {args.out}")
        if not res.paused:
            results[model] = res
    load_after = [round(x, 2) for x in os.getloadavg()]
    warns = load_warnings(f"{corpus} {budget} seed {seed} {' and '.join(models)}", load_before, load_after)
    return [record(args, corpus, budget, seed, m, trainers[m], results[m], info, load_before, load_after, warns,
                   interleave=args.interleave, turns=turns[m]) for m in models]


def final_evaluation(trainer, max_batches: int) -> dict:
    """The trained model on up to `max_batches` validation batches (the whole split if smaller),
    after its clock stopped: {"val_bpb", "val_loss", "tokens"}. Its first windows are the ones every
    --eval-interval evaluation used; both models of a seed get the same windows."""
    ev = trainer.evaluate(max_batches=max_batches)
    return {"val_bpb": ev["val_bpb"], "val_loss": ev["val_loss"], "tokens": ev["val_tokens"]}


# ---------------------------------------------------------------------------- step-time split
def time_fwd_bwd(fn, inputs: list, grad_in: tuple[int, ...], grad_out: tuple[int, ...], repeats: int,
                 sync) -> float:
    """Median seconds of fn(*inputs) forward + backward; inputs[grad_in] get gradients, and the
    outputs at grad_out are back-propagated from fixed random gradients."""
    def once(grads=None):
        xs = [x.detach().requires_grad_(i in grad_in) if torch.is_tensor(x) else x for i, x in enumerate(inputs)]
        out = fn(*xs)
        outs = [out[i] for i in grad_out] if isinstance(out, tuple) else [out]
        grads = grads or [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        return grads

    grads, times = once(), []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        once(grads)
        sync()
        times.append(time.perf_counter() - t0)
    return median(times)


class _IdentityExperts(torch.nn.Module):
    def forward(self, x_MD, offs_E):  # an op, so backward has a node; the copy is its only cost
        return x_MD * 1.0


def time_moe(mod, x_BTD: torch.Tensor, timed, autocast) -> dict[str, float]:
    """One MoE layer's pieces, each timed alone by `timed(fn, inputs, grad_in, grad_out)` under
    `autocast`: the router, MoE.gather_rows (the sort and gather; padded on a CPU in bf16, as
    MoE.routed runs it), the routed grouped GEMMs, MoE.combine_rows (the un-sort and weighted sum);
    and MoE.routed with identity experts as a check."""
    from leanmoe.model.moe import expert_counts

    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    with torch.no_grad(), autocast:  # the routing this layer chose, and its experts' rows in the layout routed uses
        idx_NK, w_NK, _ = mod.gate(x_ND)
        counts_E = expert_counts(idx_NK, mod.n_experts)
        x_PD, offs_E, order_M, row_M = mod.gather_rows(x_ND, idx_NK, counts_E)
        y_PD = mod.experts(x_PD, offs_E)

    def dispatch(x_ND, idx_NK):  # MoE.forward's counts, MoE.routed's sort and gather
        return mod.gather_rows(x_ND, idx_NK, expert_counts(idx_NK, mod.n_experts))

    parts = {"router": timed(mod.gate, [x_ND], (0,), (1, 2) if mod.aux_loss_alpha > 0 else (1,)),
             "dispatch-sort": timed(dispatch, [x_ND, idx_NK], (0,)),
             "expert GEMMs": timed(mod.experts, [x_PD, offs_E], (0,)),
             "combine": timed(mod.combine_rows, [y_PD, order_M, row_M, w_NK], (0, 3))}
    experts, mod.experts = mod.experts, _IdentityExperts()  # MoE.routed as it runs, minus the GEMMs
    try:
        parts["check"] = timed(mod.routed, [x_ND, idx_NK, w_NK, counts_E], (0, 2))
    finally:
        mod.experts = experts
    return parts


def step_split(model_name: str, cfg_path: Path, corpus: str, tokenizer: Path, args) -> dict:
    """Train a few steps with the real Trainer (its median step time is the full step), then time
    each component of that model alone at the shapes one training forward gives it."""
    from leanmoe.model.attention import MLA
    from leanmoe.model.layers import MLP
    from leanmoe.model.moe import MoE

    run_dir = args.out / "split" / model_name
    shutil.rmtree(run_dir, ignore_errors=True)
    load_before = settle(args.settle)
    tc = TrainConfig(config=str(cfg_path), data=corpus_spec(corpus), tokenizer=str(tokenizer), out=str(run_dir),
                     max_steps=args.split_steps, seq_len=args.seq_len, batch_size=args.batch_size, eval_batches=1,
                     eval_interval=10**9, save_interval=10**9, sample_tokens=0, device=args.device, dtype=args.dtype,
                     progress=False)
    trainer = Trainer(tc)
    trainer.train()
    tc, model, dev = trainer.tc, trainer.model, trainer.device
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    full = median(tc.batch_size * tc.seq_len / r["tokens_per_second"] for r in recs[1:] or recs)  # step 1 warms up
    accum = tc.batch_size // tc.micro_batch_size
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.dtype == "bf16")

    def timed(fn, inputs, grad_in, grad_out=(0,)):
        with autocast:
            return time_fwd_bwd(fn, list(inputs), grad_in, grad_out, args.split_repeats, sync)

    calls: list[tuple[str, torch.nn.Module, tuple]] = []  # (kind, module, positional inputs) in forward order
    shared = {id(m.shared_experts) for m in model.moe_layers()}
    hooks = []
    for mod in model.modules():
        kind = ("attention" if isinstance(mod, MLA) else "moe" if isinstance(mod, MoE) else
                ("shared expert" if id(mod) in shared else "dense MLP") if isinstance(mod, MLP) else None)
        if kind is not None:
            hooks.append(mod.register_forward_pre_hook(lambda m, a, kind=kind: calls.append((kind, m, a))))
    x, y = (t.to(dev) for t in trainer.loader.next_batch())
    with torch.no_grad(), autocast:
        model.compute_loss(x, y)
    for h in hooks:
        h.remove()

    parts: dict[str, float] = defaultdict(float)
    for kind, mod, inp in calls:  # the MoE's shared expert is timed through its own MLP entry
        for name, sec in (time_moe(mod, inp[0], timed, autocast) if kind == "moe" else {kind: timed(mod, inp, (0,))}).items():
            parts[name] += sec * accum * 1e3
    check = parts.pop("check", 0.0)
    parts["rest"] = full * 1e3 - sum(parts.values())
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    load_after = [round(x, 2) for x in os.getloadavg()]
    return {"parts": dict(parts), "full_step_ms": full * 1e3, "routed_identity_ms": check, "load_before": load_before,
            "load_after": load_after, "warnings": load_warnings(f"step-time split, {model_name}", load_before, load_after),
            "n_moe_layers": sum(kind == "moe" for kind, _, _ in calls),
            "n_dense_mlp": sum(kind == "dense MLP" for kind, _, _ in calls), "batch": f"{tc.batch_size} x {tc.seq_len}"}


def split_note(split: dict) -> str:
    m, d = split["MoE"], split["dense"]
    ffn = ("router", "dispatch-sort", "expert GEMMs", "shared expert", "combine")
    moe_layer = sum(m["parts"].get(p, 0) for p in ffn) / max(m["n_moe_layers"], 1)
    dense_layer = d["parts"].get("dense MLP", 0) / max(d["n_dense_mlp"], 1)
    pieces = m["parts"].get("dispatch-sort", 0) + m["parts"].get("combine", 0)
    return (f"One MoE layer (router + dispatch + routed and shared GEMMs + combine) takes {moe_layer:.1f} ms against "
            f"{dense_layer:.1f} ms for a dense MLP of equal activated parameters: {moe_layer / dense_layer:.2f}x "
            f"(issue #14's lever: <= 1.05x). Check: MoE.routed with identity experts takes "
            f"{m['routed_identity_ms']:.1f} ms, dispatch-sort + combine timed apart {pieces:.1f} ms. Noise gauge: "
            f"attention, the same module in both models, timed {m['parts']['attention']:.0f} ms in one and "
            f"{d['parts']['attention']:.0f} ms in the other.")


# ---------------------------------------------------------------------------- plot
def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(dict.fromkeys((r["corpus"], panel(r)[2]) for r in runs))  # corpus and dtype
    budgets = list(dict.fromkeys(r["budget"] for r in runs))
    fig, axes = plt.subplots(len(rows), len(budgets), figsize=(5.5 * len(budgets), 4 * len(rows)), squeeze=False)
    for (i, (corpus, dtype)), (j, budget) in ((a, b) for a in enumerate(rows) for b in enumerate(budgets)):
        ax = axes[i][j]
        for model, color in zip(MODELS, ("C0", "C1")):
            curves = [np.array(r["curve"])[:, 2:] for r in runs
                      if (*panel(r), r["model"]) == (corpus, budget, dtype, model) and r["curve"]]
            for c in curves:
                ax.plot(c[:, 0] / 60, c[:, 1], color=color, lw=0.6, alpha=0.5, marker="o" if len(c) == 1 else None)
            if curves:  # the mean over the span every seed covers
                grid = np.linspace(max(c[0, 0] for c in curves), min(c[-1, 0] for c in curves), 100)
                avg = np.mean([np.interp(grid, c[:, 0], c[:, 1]) for c in curves], axis=0)
                ax.plot(grid / 60, avg, color=color, lw=2.2, label=f"{model}, mean of {len(curves)} seed(s)")
        ax.set(title=f"{corpus}, {budget} budget, {dtype}", xlabel="wall-clock (minutes)", ylabel="val bits/byte")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line() -> str:
    """This process's command, as a user would type it."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def merge_results(paths: list[Path]) -> tuple[list[dict], list[str], list[str]]:
    """The runs, warnings and commands of earlier studies' results.json files, e.g. seeds run in
    different sessions. A (corpus, budget, seed, model, dtype) found in two files is refused: which
    to keep is the user's choice, not ours."""
    runs, warnings, commands, seen = [], [], [], {}
    for path in paths:
        try:
            data = json.loads(path.read_text())
            keys = [(r["corpus"], r["budget"], r["seed"], r["model"], panel(r)[2]) for r in data["runs"]]
            meta = data.get("meta", {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a results.json of this study ({type(e).__name__}: {e})") from None
        for key in keys:
            if key in seen:
                raise ValueError(f"{' '.join(map(str, key[:2]))} seed {key[2]} {key[3]} ({key[4]}) is in both "
                                 f"{seen[key]} and {path}: pass only one of them")
            seen[key] = path
        runs += data["runs"]
        warnings += data.get("warnings", [])
        commands.append(f"{meta.get('command', '?')} (commit {meta.get('git_commit', '?')}, {meta.get('date', '?')[:10]})")
    return runs, warnings, commands


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="the MoE preset; its dense twin is derived from it")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="change the MoE preset's fields before deriving the twin, e.g. num_nextn_predict_layers=0")
    ap.add_argument("--budgets", "--budget", nargs="+", default=["10m", "30m"], help="wall-clock time per run")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--corpora", "--data", nargs="+", default=["stdlib", "torch"],
                    help="stdlib, torch (its installed .py files), or --data specs (folder, glob, .jsonl, hf:NAME)")
    ap.add_argument("--out", type=Path, help="folder for the runs and results (default: a temporary folder)")
    ap.add_argument("--resume-study", action="store_true", help="skip runs already finished in --out")
    ap.add_argument("--eval-interval", type=int, default=40, help="validate every N steps (both models)")
    ap.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    ap.add_argument("--final-eval-batches", type=int, default=64,
                    help="evaluate each final model again on up to this many validation batches, outside its "
                         "clock (0: no)")
    ap.add_argument("--seq-len", type=int, help="default: the trainer's (256 on CPU)")
    ap.add_argument("--batch-size", type=int, help="default: the trainer's (16 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="the trainer's autocast dtype for both models (auto | fp32 | bf16)")
    ap.add_argument("--expert-lr-scale", type=float, default=TrainConfig.expert_lr_scale,
                    help="the MoE's routed experts' learning rate as a multiple of the shared one (TrainConfig.expert_lr_scale)")
    ap.add_argument("--no-progress", action="store_true", help="no per-step progress line")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "moe_vs_dense.png")
    ap.add_argument("--settle", type=float, default=90, help="seconds to wait at most for a quiet machine per run")
    ap.add_argument("--split-steps", type=int, default=6, help="trainer steps timed for the step-time split")
    ap.add_argument("--split-repeats", type=int, default=5, help="timings per component (the median is kept)")
    ap.add_argument("--no-split", action="store_true", help="skip the step-time split")
    ap.add_argument("--equal-steps", action="store_true",
                    help="after each pair, train the MoE again for the dense twin's step count (no time limit): "
                         "the margin an MoE layer costing no more than the dense MLP would reach, the most any "
                         "speed-up of the MoE can buy")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    ap.add_argument("--interleave", type=int, default=10, metavar="STEPS",
                    help="steps per turn of a pair sharing the machine (0: run the pair back to back)")
    ap.add_argument("--from-results", nargs="+", type=Path, metavar="RESULTS_JSON",
                    help="train nothing: merge earlier studies' results.json files (e.g. seeds run on different "
                         "days) into one table and plot, written to --out (results.md, results.json) and --plot")
    args = ap.parse_args()
    for flag, least in (("eval_interval", 1), ("eval_batches", 1), ("final_eval_batches", 0), ("split_steps", 1),
                        ("split_repeats", 1), ("settle", 0), ("interleave", 0)):
        if getattr(args, flag) < least:
            ap.error(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    try:
        budgets_s = [parse_duration(b) for b in args.budgets]
        overrides = parse_overrides(args.set)
        moe = ModelConfig.from_preset(args.preset, **overrides)
    except ValueError as e:
        ap.error(str(e))
    if args.from_results:
        ignored = [f"--{dest.replace('_', '-')}" for dest, value in vars(args).items()
                   if dest not in MERGE_FLAGS and value != ap.get_default(dest)]
        if ignored:
            ap.error(f"--from-results trains nothing, so {', '.join(ignored)} would be ignored: drop "
                     f"{'it' if len(ignored) == 1 else 'them'} (the merged runs keep the settings they were trained with)")
        if args.out and (args.out / "results.json").exists():
            ap.error(f"{args.out} already holds a results.json: pass another --out (it is not overwritten)")
        try:
            runs, warnings, commands = merge_results(args.from_results)
        except ValueError as e:
            ap.error(str(e))
        head = f"{dt.date.today()}: merged from " + "; ".join(f"`{c}`" for c in commands) + ".\n\n"
        report(args, runs, None, warnings, head, {"merged_from": commands})
        return
    args.out = args.out or Path(tempfile.mkdtemp(prefix="moe_vs_dense-"))
    if (args.out / "runs").exists() and not args.resume_study:
        sys.exit(f"{args.out} holds a study: pass --resume-study to continue it, or another --out")
    args.out.mkdir(parents=True, exist_ok=True)

    info = machine_info()
    configs = {"MoE": moe, "dense": dense_equivalent(moe)}
    for name, cfg in configs.items():
        path = args.out / f"{name}.config.json"
        if args.resume_study and path.is_file() and ModelConfig.from_pretrained(path) != cfg:  # its runs would be reused
            sys.exit(f"{args.out} holds a study of another {name} config ({path}); use the same --preset and --set, "
                     "or another --out")
        cfg.save(path)
        n = cfg.num_params()
        print(f"{name}: {n.total / 1e6:.2f}M params, {n.activated / 1e6:.2f}M activated", flush=True)
    tokenizers = {c: corpus_tokenizer(c, moe, args.out) for c in args.corpora}

    split_file, split = args.out / "split.json", None
    if not args.no_split:
        if args.resume_study and split_file.is_file():
            split = json.loads(split_file.read_text())
        else:
            print("step-time split: timing each component alone", flush=True)
            split = {m: step_split(m, args.out / f"{m}.config.json", args.corpora[0], tokenizers[args.corpora[0]], args)
                     for m in MODELS}
            split_file.write_text(json.dumps(split, indent=1) + "\n")
        split["batch"] = split["MoE"]["batch"]

    runs = []
    for (corpus, budget, seed), plan in groupby(run_plan(args.corpora, args.budgets, args.seeds), key=lambda p: p[:3]):
        models = [p[3] for p in plan]
        if args.interleave:
            pair = run_turns(args, corpus, budget, seed, models, tokenizers[corpus], info)
        else:
            pair = [run_one(args, corpus, budget, seed, m, args.out / f"{m}.config.json", tokenizers[corpus], info)
                    for m in models]
        runs += pair
        if args.equal_steps:
            dense = next(r for r in pair if r["model"] == "dense")
            warmup = dense.get("warmup_steps", 50)  # records before this key: the time-budget warmup then
            runs.append(run_one(args, corpus, budget, seed, EQUAL, args.out / "MoE.config.json", tokenizers[corpus],
                                info, max_steps=dense["steps"], warmup_steps=warmup))
    warnings = [w for r in [*runs, *(split[m] for m in MODELS if split)] for w in r.get("warnings", [])]
    preset = args.preset + (f" ({', '.join(args.set)})" if args.set else "")
    command = command_line()
    head = (f"{dt.date.today()}, {info['machine']}, torch {info['torch']}, commit {info['git_commit']}: `{command}`; "
            f"{preset} MoE ({configs['MoE'].num_params().activated / 1e6:.2f}M activated) vs its dense twin "
            f"({configs['dense'].num_params().activated / 1e6:.2f}M), budgets {', '.join(args.budgets)} "
            f"({', '.join(f'{b:.0f}s' for b in budgets_s)}), seeds {args.seeds}"
            f"{f', the routed experts at {args.expert_lr_scale:g}x the learning rate' if args.expert_lr_scale != 1 else ''}"
            f"{f', each pair in turns of {args.interleave} steps' if args.interleave else ', each pair back to back'}.\n\n")
    report(args, runs, split, warnings, head,
           {**info, "preset": args.preset, "set": overrides, "expert_lr_scale": args.expert_lr_scale,
            "interleave": args.interleave, "eval_interval": args.eval_interval, "eval_batches": args.eval_batches,
            "final_eval_batches": args.final_eval_batches})


def report(args, runs: list[dict], split: dict | None, warnings: list[str], head: str, meta: dict) -> None:
    """The table (results.md), everything behind it (results.json, its meta with this command and
    the time added) and the plot."""
    rows = summarize(runs)
    meta = {**meta, "command": command_line(), "date": dt.datetime.now().isoformat(timespec="seconds")}
    text = head + markdown(rows, split, warnings)
    where = f"plot: {args.plot}"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(text)
        (args.out / "results.json").write_text(json.dumps(
            {"meta": meta, "summary": rows, "split": split, "warnings": warnings, "runs": runs}, indent=1) + "\n")
        where = f"results: {args.out}/results.json, results.md; " + where
    plot(runs, args.plot)
    print("\n" + text + "\n" + where)


if __name__ == "__main__":
    main()
