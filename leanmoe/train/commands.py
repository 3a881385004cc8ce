"""`leanmoe info | train | cost`: argument parsing over library functions.

    leanmoe info [--preset P | --config C] [--forward]     a model's shape, parameters, FLOPs
    leanmoe train [--data SRC ...] [--out RUN] ...          leanmoe.train.train(TrainConfig(...))
    leanmoe cost --tokens N --gpu G (--mfu | ...)           leanmoe.train.cost.estimate_cost

`register(subparsers)` adds the three commands to leanmoe's CLI (leanmoe.cli).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["register"]


def _load_config(args):
    from leanmoe.config import ModelConfig

    cfg = ModelConfig.from_pretrained(args.config) if args.config else ModelConfig.from_preset(args.preset)
    return cfg


def cmd_info(args) -> int:
    """Print a model's shape and parameter counts; optionally time one forward pass."""
    import torch

    from leanmoe.model import Transformer

    cfg = _load_config(args)
    if args.seq_len < 1 or (args.forward and args.seq_len > cfg.max_position_embeddings):
        raise ValueError(f"--seq-len {args.seq_len}: must be in [1, max_position_embeddings = "
                         f"{cfg.max_position_embeddings}] to run this model")
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


def cmd_train(args) -> int:
    """Train a model from text (see leanmoe.train.trainer); --nproc N re-runs it under torchrun."""
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be at least 1 (the number of processes to run)")
    if args.nproc is not None and args.nproc > 1:
        from leanmoe.parallel.launch import relaunch

        return relaunch(args.argv, args.nproc)
    from leanmoe.data.sources import DataError
    from leanmoe.parallel.config import ParallelConfig
    from leanmoe.train.config import TrainConfig, parse_duration
    from leanmoe.train.cost import parse_count
    from leanmoe.train.trainer import TrainingError, train

    tc = TrainConfig(
        preset=args.preset, config=args.config, data=args.data, tokenizer=args.tokenizer, out=args.out,
        stream_limit=parse_count(args.stream_limit),
        max_steps=args.max_steps, max_tokens=parse_count(args.max_tokens) if args.max_tokens else None,
        time_budget=parse_duration(args.time_budget) if args.time_budget else None, seq_len=args.seq_len,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, schedule=args.schedule, eval_interval=args.eval_interval,
        save_interval=args.save_interval, keep_last=args.keep_last, seed=args.seed, device=args.device,
        dtype=args.dtype, compile=args.compile, resume=args.resume, mtp_weight=args.mtp_weight, fp8=args.fp8,
        mtp_layers=args.mtp_layers,
        expert_lr_scale=args.expert_lr_scale,
        price_per_hour=args.price_per_hour, gpu=args.gpu, progress=not args.quiet,
        eval_tasks=[t for t in args.eval_tasks.split(",") if t] if args.eval_tasks else None,
        eval_limit=args.eval_limit, eval_include_path=args.eval_include_path,
    )
    pc = ParallelConfig(ep=args.ep, activation_checkpointing=args.activation_checkpointing,
                        fp8_dispatch=args.fp8_dispatch, bf16_combine=args.bf16_combine,
                        timeout_s=args.dist_timeout)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports
    where = f" (rank {rank})" if rank else ""
    try:
        result = train(tc, pc)
    except (TrainingError, DataError) as e:
        print(f"leanmoe train{where}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full or read-only disk: the checkpoints written before stay intact
        what = f"{e.strerror} ({e.filename})" if e.strerror and e.filename else str(e)
        print(f"leanmoe train{where}: error: could not write the run: {what}; the checkpoints saved before are "
              "intact", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _peer_failure(e):
            raise
        # a peer froze or died: this rank gave up after --dist-timeout
        print(f"leanmoe train{where}: error: another process stopped answering ({str(e).splitlines()[0][:200]}); "
              f"gave up after --dist-timeout {args.dist_timeout:g} s; the last checkpoint is kept, continue with "
              "--resume", file=sys.stderr)
        return 1
    if rank == 0:
        print(f"checkpoint: {result.checkpoint}\nreport:     {result.report}")
    return 130 if result.interrupted else 0


def _peer_failure(e: RuntimeError) -> bool:
    """A collective of a distributed run that timed out or lost its peer (gloo and NCCL raise plain
    RuntimeErrors or torch.distributed.DistError)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                            "Broken pipe", "NCCL communicator was aborted"))


def cmd_cost(args) -> int:
    """Estimate what training a model costs."""
    from leanmoe.train.cost import estimate_cost, parse_count

    cfg = _load_config(args)
    est = estimate_cost(cfg, args.tokens, args.gpu, mfu=args.mfu,
                        tokens_per_second=parse_count(args.tokens_per_second) if args.tokens_per_second else None,
                        gpu_hours=parse_count(args.gpu_hours) if args.gpu_hours else None,
                        price_per_hour=args.price_per_hour, seq_len=args.seq_len, precision=args.precision)
    if args.json:
        import json

        print(json.dumps(est.as_dict(), indent=2))
    else:
        print("\n".join(est.lines()))
    return 0


def _model_source_args(p: argparse.ArgumentParser, default_preset: str = "tiny") -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=default_preset, help="tiny | small | deepseek-v2-lite | deepseek-v3")
    src.add_argument("--config", help="an HF config.json (or a folder holding one)")


def register(subparsers) -> None:
    """Add `info`, `train` and `cost` to an argparse subparsers object."""
    from leanmoe.train.config import SCHEDULES, TrainConfig  # no torch: keeps `leanmoe --help` fast

    info = subparsers.add_parser("info", help="show a model's shape, parameter counts and FLOPs per token")
    _model_source_args(info)
    info.add_argument("--seq-len", type=int, default=128)
    info.add_argument("--forward", action="store_true", help="build the model and time one forward pass")
    info.set_defaults(func=cmd_info)

    tr = subparsers.add_parser("train", help="train a model from raw text", description=(
        "Train a DeepSeek-style MoE from text. With no arguments: the tiny preset on the Python standard "
        "library for ten minutes. Writes metrics.jsonl, report.md, tokenizer.json and checkpoints/ into --out."))
    _model_source_args(tr)
    tr.add_argument("--data", nargs="+", metavar="SRC", help="files, folders, globs, .jsonl/.parquet, hf:NAME[:CONFIG][@SPLIT]")
    tr.add_argument("--stream-limit", default="1G", help="text read from each hf: source (default 1G bytes)")
    tr.add_argument("--tokenizer", help="reuse this tokenizer.json (or folder) instead of training one")
    tr.add_argument("--out", help="run folder (default runs/<timestamp>)")
    budget = tr.add_argument_group("budget (whichever ends first; default --time-budget 10m)")
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--max-tokens", help="e.g. 50M, 1.5B")
    budget.add_argument("--time-budget", help="wall-clock, e.g. 10m, 90s, 2h")
    tr.add_argument("--seq-len", type=int)
    tr.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    tr.add_argument("--micro-batch-size", type=int, help="sequences per forward pass (gradient accumulation)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default 3e-3 * (256/hidden_size)^0.78)")
    tr.add_argument("--expert-lr-scale", type=float, default=TrainConfig.expert_lr_scale,
                    help=f"the routed experts' learning rate as a multiple of --lr (default {TrainConfig.expert_lr_scale:g})")
    tr.add_argument("--warmup-steps", type=int)
    tr.add_argument("--schedule", choices=SCHEDULES, default=TrainConfig.schedule,
                    help=f"learning-rate schedule after the warm-up (default {TrainConfig.schedule}); wsd holds the "
                    f"peak, then decays over the last {TrainConfig.decay_fraction:.0%}% of the budget")
    tr.add_argument("--mtp-weight", type=float, help="MTP loss weight (default: the config's, 0.3)")
    tr.add_argument("--mtp-layers", type=int, help="multi-token prediction modules (default: the preset's; tiny has "
                                                   "none, small 1); a module also drafts for speculative decoding")
    tr.add_argument("--fp8", action="store_true", help="train linear layers and experts in fine-grained FP8 "
                    "(DeepSeek-V3 section 3.3; emulated on CPU)")
    tr.add_argument("--eval-interval", type=int)
    tr.add_argument("--save-interval", type=int)
    tr.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    tr.add_argument("--eval-tasks", help="lm-eval tasks to score the final checkpoint on, for report.md "
                    "(e.g. hellaswag,arc_easy; needs pip install 'leanmoe[eval]')")
    tr.add_argument("--eval-limit", type=float, help="documents per --eval-tasks task (a fraction if < 1)")
    tr.add_argument("--eval-include-path", help="a folder of extra lm-eval task YAMLs")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps (default: cuda, else mps, else cpu)")
    tr.add_argument("--dtype", choices=["auto", "fp32", "bf16", "float32", "bfloat16"], default="auto",
                    help="autocast dtype: auto | fp32 | bf16 (or float32 | bfloat16; auto: bf16 on a GPU and on a "
                         "single-process CPU with native bf16 (AVX512-BF16/AMX), fp32 elsewhere)")
    tr.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    tr.add_argument("--gpu", help="GPU type for the cost report (default: detected)")
    tr.add_argument("--price-per-hour", type=float, help="$ per device-hour for the cost report")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    dist = tr.add_argument_group("distributed (see docs/distributed.md)")
    dist.add_argument("--nproc", type=int, help="run on N processes of this machine (re-runs the command under "
                      "torchrun); across machines call torchrun --nproc-per-node N -m leanmoe train ...")
    dist.add_argument("--ep", type=int, help="expert-parallel degree: experts split over this many ranks "
                      "(divides the process count and n_routed_experts; default 1)")
    dist.add_argument("--activation-checkpointing", action="store_true",
                      help="recompute attention, MLPs and experts in backward to save memory")
    dist.add_argument("--fp8-dispatch", action="store_true", help="send expert-parallel dispatch payloads as FP8")
    dist.add_argument("--bf16-combine", action="store_true",
                      help="send combine payloads and gradient all-to-alls as bf16")
    dist.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                      help="give up when another process does not answer a collective for this long (a frozen or "
                           "dead rank; default 600; raise it for checkpoints that take longer to write)")
    tr.set_defaults(func=cmd_train)

    co = subparsers.add_parser("cost", help="estimate the GPU-hours and dollars a training run takes")
    _model_source_args(co, default_preset="deepseek-v3")
    co.add_argument("--tokens", required=True, help="training tokens, e.g. 14.8T")
    co.add_argument("--gpu", default="h800", help="h800 | h100 | h200 | b200 | a100 | l40s | rtx4090 | mi300x ...")
    how = co.add_mutually_exclusive_group(required=True)
    how.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation, e.g. 0.4")
    how.add_argument("--tokens-per-second", help="measured throughput per GPU")
    how.add_argument("--gpu-hours", help="GPU-hours spent (prints the implied MFU)")
    co.add_argument("--price-per-hour", type=float, help="$ per GPU-hour (default: the GPU table's)")
    co.add_argument("--seq-len", type=int, default=4096)
    co.add_argument("--precision", choices=["bf16", "fp8"], default="bf16", help="peak to measure MFU against")
    co.add_argument("--json", action="store_true")
    co.set_defaults(func=cmd_cost)
