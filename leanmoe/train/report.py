"""What a run shows its user: the live progress line while it trains, and report.md when it ends
(what it achieved, what it cost, how balanced the experts were).

The report is written from a `RunSummary`, a plain value the trainer fills in: every number comes
from the run itself (metrics.jsonl, the trainer's counters) or from the cost model in
leanmoe.train.cost, which is labelled as an estimate.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanmoe.config import ModelConfig
from leanmoe.device import cpu_has_native_bf16
from leanmoe.train.config import TrainConfig
from leanmoe.train.cost import GPU, GPUS, estimate_cost

__all__ = ["TrainResult", "RunSummary", "ProgressDisplay", "write_report", "read_metrics", "device_name"]


@dataclass
class TrainResult:
    """What `train()` returns: the run's counters and where its outputs are."""

    run_dir: Path
    steps: int
    tokens: int
    elapsed: float
    final_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    tokens_per_second: float  # median over the steps this process took
    checkpoint: Path | None
    report: Path | None
    interrupted: bool = False
    paused: bool = False  # train(stop_after=N) returned before the budget was spent; train() again continues
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """Everything report.md says about a run, as plain values."""

    train_config: TrainConfig  # resolved
    model_config: ModelConfig
    result: TrainResult
    world_size: int
    device_type: str  # cpu | cuda | mps
    device_name: str  # "NVIDIA H200" or the CPU model with its thread count
    gpu: GPU | None = None  # the price/peak table entry (None on CPU/MPS or an unknown GPU)
    peak_memory_gib: float | None = None  # CUDA: peak allocated on rank 0
    load_total: torch.Tensor | None = None  # [n_moe_layers, E] tokens per expert over the run
    last_eval: dict[str, Any] | None = None  # leanmoe.train.evaluate.evaluate() of the final step
    harness: dict[str, dict[str, Any]] | None = None  # lm-eval's results[task][metric] (--eval-tasks)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the number of threads torch uses, its widest vector
    instructions torch dispatches to (AVX2, AVX512, ...) and whether it has native bf16: two CPUs
    that print the same model name can train at very different speeds."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu} ({torch.get_num_threads()} threads, {isa}{', native bf16' if cpu_has_native_bf16() else ''})"


def _plot_loss(records, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss = np.array([r["loss"] for r in records])
    if not len(loss):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.6, alpha=0.35, label="train loss (step)")
    w = max(1, len(loss) // 50)
    if w > 1:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"train loss ({w}-step mean)")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_load(records, path: Path, names: list[str]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r.get("load_max_over_mean")]
    if not recs:
        return False
    arr = np.array([r["load_max_over_mean"] for r in recs])  # [steps, layers]
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = max(1, len(steps) // 50)
    for layer in range(arr.shape[1]):
        y = np.convolve(arr[:, layer], np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], y, lw=1.2, label=names[layer] if layer < len(names) else f"MoE {layer}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title("expert load balance per step" + (f" ({w}-step mean)" if w > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _moe_layer_names(cfg) -> list[str]:
    names = [f"layer {i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    names += [f"MTP {k + 1}" for k in range(cfg.num_nextn_predict_layers)
              if cfg.is_moe_layer(cfg.num_hidden_layers + k)]
    return names


def write_report(run: RunSummary, run_dir: Path) -> Path:
    """Write RUN/report.md (and loss.png, expert_load.png) atomically; returns its path."""
    tc, cfg, result, n_dev = run.train_config, run.model_config, run.result, run.world_size
    load_total, last_eval = run.load_total, run.last_eval
    records = read_metrics(run_dir)
    loss_png = _plot_loss(records, run_dir / "loss.png")
    load_png = _plot_load(records, run_dir / "expert_load.png", _moe_layer_names(cfg))
    fpt = cfg.flops_per_token(tc.seq_len)
    train_flops = fpt * result.tokens
    achieved = fpt * result.tokens_per_second  # FLOP/s at the median step speed, all devices together
    hours = result.elapsed / 3600 * n_dev  # device-hours
    lines = [
        f"# Training report: {run_dir.name}",
        "",
        f"Written {dt.datetime.now().isoformat(timespec='seconds')} by leanmoe; device: {run.device_name}; "
        f"torch {torch.__version__}; dtype {tc.dtype}.",
        "",
        "## Model",
        "",
        "```",
        cfg.summary(),
        "```",
        "",
        "## Run",
        "",
        "| steps | tokens | wall time | median tokens/s | final train loss | val loss | val bits/byte |",
        "|---|---|---|---|---|---|---|",
        f"| {result.steps} | {result.tokens:,} | {_duration(result.elapsed)} | {result.tokens_per_second:,.0f} | "
        f"{_f(result.final_loss)} | {_f(result.val_loss)} | {_f(result.val_bpb)} |",
        "",
        f"Batch {tc.batch_size} x {tc.seq_len} tokens"
        + (f" ({tc.batch_size // (tc.micro_batch_size * n_dev)} micro-batches of {tc.micro_batch_size}"
           + (f" on each of {n_dev} processes" if n_dev > 1 else "") + ")"
           if tc.micro_batch_size * n_dev != tc.batch_size else "")
        + f", peak lr {tc.lr} ({tc.schedule}, {tc.warmup_steps} warm-up "
        f"steps), data: {', '.join(tc.data) if tc.data else 'the Python standard library'}."
        + (f" Peak GPU memory allocated: {run.peak_memory_gib:.1f} GiB" + (" (rank 0)" if n_dev > 1 else "") + "."
           if run.peak_memory_gib is not None else "")
        + (" The run was interrupted and can be resumed with `--resume`." if result.interrupted else ""),
        "",
    ]
    if loss_png:
        lines += ["![loss](loss.png)", ""]
    lines += ["## Compute and cost", ""]
    lines += [f"- Training FLOPs per token at sequence length {tc.seq_len}: {fpt:.3g} (6 x activated matmul "
              "parameters + causal attention + MTP; see `ModelConfig.flops_per_token`).",
              f"- Training FLOPs of this run: {train_flops:.3g}; achieved {achieved / 1e9:,.1f} GFLOP/s at the median "
              "step speed."]
    gpu = run.gpu
    if gpu is not None:
        peak = gpu.peak_flops("bf16")
        price = tc.price_per_hour if tc.price_per_hour is not None else gpu.price_per_hour
        lines += [f"- MFU: {achieved / (peak * n_dev):.1%} of {n_dev} x {gpu.name.upper()} at "
                  f"{peak / 1e12:.0f} TFLOP/s dense BF16 peak each.",
                  f"- GPU-hours: {hours:.3f}; cost at ${price:.2f}/GPU-hour: ${hours * price:.2f}."]
    else:
        what = run.device_type.upper()
        lines.append(f"- MFU is not meaningful on the {what}: there is no tensor-core peak to compare against.")
        if tc.price_per_hour is not None:
            lines.append(f"- Device-hours: {hours:.3f}; cost at ${tc.price_per_hour:.2f}/hour: ${hours * tc.price_per_hour:.4f}.")
        else:
            lines.append(f"- Device-hours: {hours:.3f} (pass --price-per-hour to price them).")
    ref = estimate_cost(cfg, max(result.tokens, 1), "h100", mfu=0.4, seq_len=tc.seq_len)
    lines += [f"- Estimate, not a measurement: the same {result.tokens:,} tokens on an H100 at 40% MFU would take "
              f"{ref.gpu_hours * 3600:.1f} GPU-seconds (${ref.cost_usd:.4f} at ${GPUS['h100'].price_per_hour:.2f}/hour).",
              ""]

    lines += ["## Expert load balance", ""]
    if load_total is not None and load_total.numel():
        names = _moe_layer_names(cfg)
        per_step = np.array([r["load_max_over_mean"] for r in records if r.get("load_max_over_mean")])
        lines += ["Tokens per routed expert, as max/mean (1.0 is perfect balance). 'Whole run' sums every step's "
                  "counts; 'mean per step' averages each step's own ratio; 'last step' is the final one.", "",
                  "| MoE layer | whole run | mean per step | last step | least-used expert share |",
                  "|---|---|---|---|---|"]
        for i, row in enumerate(load_total.float()):
            mean = row.mean().clamp(min=1e-9)
            mps = per_step[:, i].mean() if len(per_step) else float("nan")
            last = per_step[-1, i] if len(per_step) else float("nan")
            name = names[i] if i < len(names) else f"moe {i}"
            lines.append(f"| {name} | {(row.max() / mean).item():.2f} | {mps:.2f} | {last:.2f} | "
                         f"{(row.min() / row.sum().clamp(min=1e-9)).item():.2%} |")
        lines.append("")
        if load_png:
            lines += ["![expert load](expert_load.png)", ""]
    else:
        lines += ["No MoE layers in this model.", ""]

    if run.harness:
        lines += ["## Benchmarks (lm-evaluation-harness, final checkpoint)", "", "| task | metric | value |",
                  "|---|---|---|"]
        for task, metrics in sorted(run.harness.items()):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in key:
                    lines.append(f"| {task} | {key.split(',')[0]} | {value:.4f} |")
        lines.append("")
    if last_eval and last_eval.get("samples"):
        lines += ["## Samples (last validation)", ""]
        for s in last_eval["samples"]:
            lines += ["```", s["prompt"] + s["completion"], "```", ""]
    path = Path(run_dir) / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ---------------------------------------------------------------------------- the live display
def fmt_eta(seconds: float) -> str:
    """1:02:03, 4:05, or ? when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressDisplay:
    """The terminal side of a run: `[leanmoe]` messages, a tqdm bar with step, loss, tokens/s, MFU
    and ETA, and the validation lines with samples. Silent when `enabled` is False (--quiet, or
    ranks other than 0)."""

    def __init__(self, enabled: bool, rank0: bool = True):
        self.enabled, self.rank0 = enabled, rank0
        self.bar = None

    def say(self, msg: str) -> None:
        if self.enabled:
            print(f"[leanmoe] {msg}", flush=True)

    def warn(self, msg: str) -> None:
        """Something the user must see even with --quiet (stderr, rank 0 only)."""
        if self.rank0:
            print(f"[leanmoe] warning: {msg}", file=sys.stderr, flush=True)

    def open(self) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1000, bar_format="{percentage:3.0f}%|{bar:20}| {desc}", dynamic_ncols=True)

    def update(self, progress: float, step: int, loss: float, tps: float, mfu: float | None, elapsed: float) -> None:
        """`progress` in [0, 1] of the budget; the ETA assumes the rest goes as fast as so far."""
        if self.bar is None:
            return
        self.bar.n = min(1000, int(progress * 1000))
        eta = elapsed * (1 - progress) / progress if progress > 0 else float("inf")
        mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a (cpu)"
        self.bar.set_description_str(f"step {step} | loss {loss:.3f} | {tps:,.0f} tok/s | MFU {mfu_s} | "
                                     f"ETA {fmt_eta(eta)}")

    def evaluation(self, step: int, ev: dict[str, Any]) -> None:
        lines = [f"step {step}: val_loss {ev['val_loss']:.4f}, val_bpb {ev['val_bpb']:.4f}"]
        for s in ev["samples"][:2]:
            lines.append(f"  {s['prompt']!r} -> {s['completion'][:120]!r}")
        if self.bar is not None:
            for line in lines:
                self.bar.write(line)
        elif self.enabled:
            print("\n".join(lines), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
