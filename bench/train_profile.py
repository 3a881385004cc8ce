"""Where a training step's time goes on a GPU, and bf16 vs FP8 training speed, on one preset.

Builds the preset (MTP and all, as `leanmoe train` trains it), feeds it random tokens (speed does
not depend on the text), and runs full steps: forward, backward, fused AdamW, router-bias update,
under bf16 autocast. Variants alternate step by step in one process so clock drift hits all alike:

    bf16            the default GPU recipe
    fp8:triton      --fp8 with leanmoe's Triton FP8 GEMMs
    fp8:cublas      --fp8 with cuBLAS's blockwise FP8 GEMM for the plain and m-grouped GEMMs (sm_90)
    fp8:auto        --fp8 as it trains by default (LEANMOE_FP8_GEMM=auto: the measured choice per call)

Prints tokens/s, the ratio to bf16 and MFU (ModelConfig.flops_per_token over the GPU's dense bf16
peak), then a torch.profiler table of one variant's steps: the top kernels by GPU time and the
share of each kind (GEMMs, grouped GEMMs, attention, FP8 casts, optimizer, the rest).

    python bench/train_profile.py                              # small, batch 16 x 2048, eager
    python bench/train_profile.py --variants bf16 fp8:auto --profile fp8:auto
    python bench/train_profile.py --variants bf16 --compile --batch-size 32   # the trainer's GPU default
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch

from leanmoe import ModelConfig, Transformer
from leanmoe.train.cost import find_gpu
from leanmoe.train.fp8 import convert_to_fp8
from leanmoe.train.optim import build_optimizer

KINDS = [  # (kind, substrings of a kernel name), first match wins
    ("fp8 GEMM (cuBLAS)", ("sm90_xmma_gemm_e4m3", "e4m3", "fp8_gemm")),
    ("fp8 GEMM (Triton)", ("_gemm_nt_kernel",)),
    ("fp8 casts", ("_per_token_cast", "_per_block_cast")),
    ("grouped GEMM", ("grouped", "Grouped", "GroupProblemShape", "enable_3x_kernel_for_sm9x")),  # torch._grouped_mm
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("GEMM", ("gemm", "sm90_xmma", "cutlass", "ampere", "nvjet", "Kernel2")),
    ("optimizer", ("multi_tensor", "adam", "Adam")),
    ("sort / scatter / index", ("sort", "Sort", "scatter", "index", "gather", "radix", "cumsum", "Scan")),
    ("copies / casts", ("copy", "Copy", "cast", "to_copy")),
    ("softmax / loss", ("softmax", "log_softmax", "nll", "cross_entropy")),
    ("triton (inductor)", ("triton_",)),
]


def make_variant(cfg: ModelConfig, name: str, device: str, compile_: bool, seed: int):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    if name.startswith("fp8"):
        convert_to_fp8(model)
    model = model.to(device).train()
    opt = build_optimizer(model, 1e-3)
    backend = name.split(":")[1] if ":" in name else None
    loss_fn = torch.compile(model.compute_loss) if compile_ else model.compute_loss

    def step(x, y):
        if backend:
            os.environ["LEANMOE_FP8_GEMM"] = backend
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(x, y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_bias()
        return loss.detach()
    return step


def kind_of(kernel: str) -> str:
    for kind, keys in KINDS:
        if any(k in kernel for k in keys):
            return kind
    return "other"


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def profile(step, batches, steps: int, tokens_per_step: int, dev: str) -> None:
    """Kernel time by kind and the top kernels (on a CPU: operators' self CPU time instead)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sync(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for i in range(steps):
            step(*batches[i % len(batches)])
        sync(dev)
    if dev == "cuda":
        per_kernel = [(e.self_device_time_total, e.count, e.key) for e in prof.key_averages()
                      if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        per_kernel = [(e.self_cpu_time_total, e.count, e.key) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    per_kernel.sort(reverse=True)
    total = sum(t for t, _, _ in per_kernel)
    by_kind: dict[str, float] = defaultdict(float)
    for t, _, key in per_kernel:
        by_kind[kind_of(key)] += t
    print(f"\n{dev} time in {steps} profiled steps: {total / 1e3 / steps:.1f} ms/step of kernels "
          f"({tokens_per_step} tokens/step)")
    print(f"{'kind':28s} {'ms/step':>8s} {'share':>6s}")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:28s} {t / 1e3 / steps:8.2f} {100 * t / total:5.1f}%")
    print(f"\ntop kernels\n{'ms/step':>8s} {'calls':>6s} {'share':>6s}  kernel")
    for t, n, key in per_kernel[:30]:
        print(f"{t / 1e3 / steps:8.2f} {n // steps:6d} {100 * t / total:5.1f}%  {key[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 3 warm-up steps)")
    ap.add_argument("--variants", nargs="+", default=["bf16", "fp8:triton", "fp8:auto"],
                    help="bf16, fp8:triton, fp8:cublas, fp8:auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile compute_loss (as the trainer on GPU)")
    ap.add_argument("--profile", default="bf16", help="variant to profile (one of --variants; 'none': skip)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda (what this is for); cpu only checks the script runs")
    args = ap.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_profile.py times GPU kernels: no CUDA device here "
                         "(--device cpu only checks the script)")
    cfg = ModelConfig.from_preset(args.preset)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    gpu = find_gpu(name) if dev == "cuda" else None
    peak = gpu.peak_flops("bf16") if gpu else None
    fpt = cfg.flops_per_token(args.seq_len)
    tokens = args.batch_size * args.seq_len
    gen = torch.Generator(device=dev).manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=dev, generator=gen)
        batches.append((ids[:, :-1], ids[:, 1:]))
    if args.profile not in ("none", *args.variants):
        raise SystemExit(f"--profile {args.profile!r} is not one of --variants {args.variants} (or 'none')")
    steps = {v: make_variant(cfg, v, dev, args.compile, 0) for v in args.variants}
    print(f"{args.preset}: batch {args.batch_size} x {args.seq_len}, compile={args.compile}, "
          f"{name}, torch {torch.__version__}")
    first: dict[str, float] = {}
    for v, f in steps.items():  # warm-up (and compilation)
        t = time.perf_counter()
        first[v] = float(f(*batches[0]))
        for i in range(2):
            f(*batches[1 + i])
        sync(dev)
        print(f"  {v}: warm-up {time.perf_counter() - t:.1f} s, first loss {first[v]:.4f}", flush=True)
    times: dict[str, list[float]] = {v: [] for v in steps}
    for i in range(args.steps):
        for v, f in steps.items():
            sync(dev)
            t = time.perf_counter()
            f(*batches[i % len(batches)])
            sync(dev)
            times[v].append(time.perf_counter() - t)
    base = statistics.median(times[args.variants[0]])
    vs = "vs " + args.variants[0]
    print(f"\n{'variant':14s} {'s/step':>8s} {'spread':>15s} {'tokens/s':>10s} {vs:>9s} {'MFU':>6s}")
    for v, ts in times.items():
        med = statistics.median(ts)
        mfu = f"{tokens * fpt / med / peak:.1%}" if peak else "n/a"
        print(f"{v:14s} {med:8.4f} {min(ts):7.4f}-{max(ts):.4f} {tokens / med:10.0f} {base / med:8.2f}x {mfu:>6s}")
    if args.profile != "none" and args.profile in steps:
        print(f"\nprofile of {args.profile}:")
        profile(steps[args.profile], batches, args.profile_steps, tokens, dev)


if __name__ == "__main__":
    main()
