"""`leanmoe <command>`: thin argument parsing over library functions a user could call directly."""

from __future__ import annotations

import argparse
import sys
import time


def _load_config(args):
    from leanmoe.config import ModelConfig

    cfg = ModelConfig.from_pretrained(args.config) if args.config else ModelConfig.from_preset(args.preset)
    return cfg


def cmd_info(args) -> int:
    """Print a model's shape and parameter counts; optionally time one forward pass."""
    import torch

    from leanmoe.model import Transformer

    cfg = _load_config(args)
    print(cfg.summary())
    print(f"training FLOPs per token at sequence length {args.seq_len}: {cfg.flops_per_token(args.seq_len):.3e}")
    if args.forward:
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len))
        with torch.no_grad():
            model(ids)  # warm-up
            t0 = time.perf_counter()
            logits = model(ids)
            dt = time.perf_counter() - t0
        print(f"forward pass [1, {args.seq_len}] -> logits {list(logits.shape)} in {dt * 1e3:.1f} ms "
              f"({args.seq_len / dt:,.0f} tokens/s, {torch.get_num_threads()} CPU threads)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanmoe", description="Train and serve DeepSeek-V3-style MoE models.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show a model's shape, parameter counts and FLOPs per token")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="tiny | small | deepseek-v2-lite | deepseek-v3")
    src.add_argument("--config", help="an HF config.json (or a folder holding one)")
    info.add_argument("--seq-len", type=int, default=128)
    info.add_argument("--forward", action="store_true", help="build the model and time one forward pass")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"leanmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
