"""The core claim: at equal activated parameters and equal wall-clock, MoE buys quality.

Trains the MoE `tiny` preset and a dense model with the same activated parameter count (same
code, every layer a dense SwiGLU MLP sized to match) for the same wall-clock budget on the same
machine, data, tokenizer and validation windows, then prints validation bits per byte for both.
The result is reported as measured, whichever way it falls.

    python bench/moe_vs_dense.py                   # 5 minutes per model on the stdlib corpus
    python bench/moe_vs_dense.py --budget 2m --data my_corpus/
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from leanmoe import ModelConfig
from leanmoe.train import TrainConfig, Trainer
from leanmoe.train.config import parse_duration


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--budget", default="5m", help="wall-clock training time per model")
    ap.add_argument("--data", nargs="+")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--out", default=None, help="folder for both runs (default: a temporary folder)")
    args = ap.parse_args()

    moe = ModelConfig.from_preset(args.preset)
    dense = dense_equivalent(moe)
    out = Path(args.out or tempfile.mkdtemp(prefix="moe_vs_dense-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    tokenizer = None
    for name, cfg in (("MoE", moe), ("dense", dense)):
        cfg_path = out / f"{name}.config.json"
        cfg.save(cfg_path)
        tc = TrainConfig(config=str(cfg_path), data=args.data, out=str(out / name), time_budget=parse_duration(args.budget),
                         seq_len=args.seq_len, batch_size=args.batch_size, tokenizer=tokenizer)
        result = Trainer(tc).train()
        tokenizer = str(out / "MoE" / "tokenizer.json")  # the dense run reuses the MoE run's tokenizer
        n = cfg.num_params()
        rows.append((name, n.total, n.activated, result))
    print(f"\nequal wall-clock: {args.budget} per model; runs in {out}")
    print(f"{'model':6s} {'total params':>13s} {'activated':>10s} {'steps':>6s} {'tokens':>10s} {'tok/s':>7s} "
          f"{'val loss':>9s} {'val bpb':>8s}")
    for name, total, active, r in rows:
        print(f"{name:6s} {total / 1e6:12.2f}M {active / 1e6:9.2f}M {r.steps:6d} {r.tokens:10,d} "
              f"{r.tokens_per_second:7.0f} {r.val_loss:9.4f} {r.val_bpb:8.4f}")
    (_, _, _, m), (_, _, _, d) = rows
    better = "MoE" if m.val_bpb < d.val_bpb else "dense"
    print(f"val bpb dense/MoE = {d.val_bpb / m.val_bpb:.3f} ({better} is better by "
          f"{abs(d.val_bpb - m.val_bpb):.4f} bits/byte)")


if __name__ == "__main__":
    main()
