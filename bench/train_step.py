"""Training-step throughput: leanmoe vs transformers' DeepseekV3ForCausalLM on the same config.

A full step is forward, backward and AdamW. Both models are built from one ModelConfig and hold
the same weights (leanmoe's are copied into transformers' model through an HF checkpoint), MTP
is off (transformers does not train it), and the steps are timed alternately in one process so
machine noise hits both. Prints tokens/s per variant and the ratio to transformers' default.

    python bench/train_step.py                       # tiny preset, CPU
    python bench/train_step.py --compile --steps 10  # also time torch.compile'd leanmoe
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

import leanmoe
from leanmoe import ModelConfig, Transformer
from leanmoe.kernels.grouped_gemm import grouped_mm_backend


def build_transformers(cfg: ModelConfig, model: Transformer, experts_implementation: str):
    import transformers

    with tempfile.TemporaryDirectory() as d:
        leanmoe.save_pretrained(model, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
                d, experts_implementation=experts_implementation, attn_implementation="sdpa")
    return hf


def make_step(model, ids, kind: str, compile_loss: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    if kind == "leanmoe":
        loss_fn = torch.compile(model.compute_loss) if compile_loss else model.compute_loss

        def step():
            loss = loss_fn(inp, tgt).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_bias()
            return loss.detach()
    else:
        def step():
            # transformers shifts labels itself: pass the unshifted window
            loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--compile", action="store_true", help="also time leanmoe with torch.compile")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="autocast dtype for both models (float32: none)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(cfg).to(device).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    variants = {"leanmoe": make_step(model, ids, "leanmoe")}
    if args.compile:
        compiled = Transformer(cfg).to(device).train()
        compiled.load_state_dict(model.state_dict())
        variants["leanmoe + torch.compile"] = make_step(compiled, ids, "leanmoe", compile_loss=True)
    for impl in ("grouped_mm", "eager"):
        hf = build_transformers(cfg, model, impl).to(device).train()
        variants[f"transformers (experts={impl})"] = make_step(hf, ids, "hf")

    amp = (torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
           else torch.autocast(device, enabled=False))
    times: dict[str, list[float]] = {k: [] for k in variants}
    with amp:
        losses = {k: float(f()) for k, f in variants.items()}  # warm-up (and compilation)
        for f in variants.values():
            f()
        for _ in range(args.steps):
            for name, f in variants.items():  # alternate so noise hits every variant alike
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                f()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)

    tokens = args.batch_size * args.seq_len
    base = statistics.median(times["transformers (experts=grouped_mm)"])
    print(f"preset={args.preset} batch={args.batch_size} seq_len={args.seq_len} device={device} "
          f"threads={torch.get_num_threads()} dtype={args.dtype} "
          f"grouped_mm backend={grouped_mm_backend(device, torch.float32)} torch={torch.__version__}")
    print(f"{'variant':36s} {'first loss':>10s} {'median s/step':>14s} {'tokens/s':>10s} {'vs transformers':>16s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:36s} {losses[name]:10.4f} {med:14.4f} {tokens / med:10.0f} {base / med:15.2f}x")


if __name__ == "__main__":
    main()
