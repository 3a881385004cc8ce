"""The training loop: raw text in, a trained DeepSeek-style MoE, its tokenizer, checkpoints and a
cost report out.

One `Trainer` owns a run folder:

    RUN/metrics.jsonl     one JSON object per logged step (step, loss, lr, tokens_per_second, ...);
                          validation steps also carry val_loss and val_bpb
    RUN/report.md         what the run cost and achieved, with plots (loss.png, expert_load.png)
    RUN/tokenizer.json    (+ tokenizer_config.json)
    RUN/checkpoints/step-N/, RUN/checkpoints/latest

Each optimizer step: gradient-accumulated forward/backward of next-token + MTP + balance losses,
gradient clipping, AdamW, then the aux-loss-free router-bias update from the step's expert loads.
The budget (steps, tokens or wall-clock) drives the learning-rate schedule through its progress.

Launched by torchrun (WORLD_SIZE > 1) the same loop runs distributed (leanmoe.parallel): the
model is parallelized (expert parallelism over --ep ranks, FSDP2 over all), --batch-size is the
global batch and each rank draws its own share of it; losses, expert loads, gradient norms and
evaluation sums are reduced across ranks so every rank takes the same decisions (and holds the
same router biases); the clock that budgets and schedules use is rank 0's; only rank 0 prints,
writes metrics, the report and checkpoint files (every rank helps gather the full checkpoint).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leanmoe.config import ModelConfig
from leanmoe.model import LatentCache, Transformer
from leanmoe.parallel.groups import ParallelConfig
from leanmoe.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from leanmoe.train.config import TrainConfig
from leanmoe.train.cost import find_gpu
from leanmoe.train.optim import build_optimizer, lr_at

__all__ = ["Trainer", "TrainResult", "TrainingError", "train"]


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what to change. Checkpoints are kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    elapsed: float
    final_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    tokens_per_second: float
    checkpoint: Path | None
    report: Path | None
    interrupted: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def _available_memory(device: torch.device) -> int | None:
    """Bytes free for this run on the device (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_step_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, act_bytes: int = 4,
                         world_size: int = 1) -> int:
    """A deliberately generous estimate of peak bytes for one micro-batch: weights, gradients and
    two AdamW moments in fp32 (sharded over `world_size` ranks), plus the activations autograd
    keeps per token and layer (attention projections and expanded heads, routed copies of each
    token, the vocabulary logits)."""
    n = cfg.num_params()
    params = n.total + n.mtp
    d, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.moe_intermediate_size
    k = cfg.num_experts_per_tok
    per_layer = (6 * d + 4 * h * cfg.qk_head_dim + 2 * h * cfg.v_head_dim + 3 * cfg.latent_dim
                 + max(3 * cfg.intermediate_size, k * (3 * d + 4 * f) + 4 * f * cfg.n_shared_experts))
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per_token = layers * per_layer + 4 * cfg.vocab_size * (1 + cfg.num_nextn_predict_layers)
    return int(16 * params / world_size + 1.5 * micro_batch * seq_len * per_token * act_bytes)


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Trainer:
    """Build with a TrainConfig (and a ParallelConfig for distributed launches), then `train()`.
    See the module docstring for the run layout."""

    def __init__(self, tc: TrainConfig, pc: ParallelConfig | None = None):
        self.tc = tc
        self.pc = pc or ParallelConfig()
        self.device = resolve_device(tc.device)
        self.rank, self.world = 0, 1  # set by setup() under torchrun
        self.dims = None  # leanmoe.parallel.ParallelDims of a distributed run
        self._owns_process_group = False
        self.run_dir: Path | None = None
        self.model: Transformer | None = None
        self.tokenizer = None
        self.shards = None
        self.start_state: dict[str, Any] | None = None
        self._compiled_loss = None
        self._auto_micro_batch = False  # set when the micro-batch is a default `_check` may shrink
        self._compile_explicit = tc.compile == "on"  # --compile on, not the GPU default

    # ------------------------------------------------------------------ setup
    def _resolve_run_dir(self) -> Path:
        tc = self.tc
        if tc.out:
            return Path(tc.out)
        if tc.resume:
            runs = sorted((p for p in Path("runs").glob("*") if latest_checkpoint(p)), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise TrainingError("--resume: no run with a checkpoint under runs/; pass --out RUN_DIR")
            return runs[-1]
        return Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")

    def _model_config(self) -> ModelConfig:
        tc = self.tc
        cfg = ModelConfig.from_pretrained(tc.config) if tc.config else ModelConfig.from_preset(tc.preset)
        changes = {}
        if tc.mtp_weight is not None:
            changes["mtp_loss_weight"] = tc.mtp_weight
        if tc.fp8:
            changes["fp8"] = True
        if tc.bias_update_speed is not None:
            changes["bias_update_speed"] = tc.bias_update_speed
        return cfg.replace(**changes) if changes else cfg

    def _fill_defaults(self, cfg: ModelConfig) -> None:
        """Device-dependent defaults for knobs left as None."""
        tc, gpu = self.tc, self.device.type == "cuda"
        if tc.seq_len is None:
            tc.seq_len = min(2048 if gpu else 256, cfg.max_position_embeddings)
        if tc.batch_size is None:
            tc.batch_size = (32 if gpu else 16) * self.world  # the global batch
        if tc.micro_batch_size is None:  # per rank; `_check` shrinks it to the free memory
            tc.micro_batch_size = max(1, tc.batch_size // self.world)
            self._auto_micro_batch = True
        if tc.lr is None:
            # 3e-3 at the tiny width (best of 1.25e-3 / 3e-3 / 5e-3 in 3-minute CPU runs), falling
            # as hidden^-0.78 to DeepSeek-V3's own 2.2e-4 at hidden 7168
            tc.lr = float(f"{3e-3 * (256 / cfg.hidden_size) ** 0.78:.2g}")
        if not tc.budget_given():
            tc.time_budget = 600.0
        if tc.warmup_steps is None:
            tc.warmup_steps = max(1, min(100, int(0.05 * tc.max_steps))) if tc.max_steps else 50
        if tc.eval_interval is None:
            tc.eval_interval = max(1, min(100, tc.max_steps // 5)) if tc.max_steps else 100
        if tc.save_interval is None:
            tc.save_interval = 2 * tc.eval_interval
        if tc.dtype == "auto":
            tc.dtype = "bf16" if gpu else "fp32"
        if tc.compile == "auto":
            tc.compile = "on" if gpu else "off"

    def _check(self, cfg: ModelConfig) -> None:
        tc = self.tc
        if tc.seq_len > cfg.max_position_embeddings:
            raise TrainingError(
                f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings}); "
                f"use --seq-len {cfg.max_position_embeddings} or less, or a config with longer positions")
        if tc.seq_len < 2:
            raise TrainingError(f"--seq-len must be at least 2, got {tc.seq_len}")
        if tc.batch_size < 1 or tc.micro_batch_size < 1 or tc.batch_size % (tc.micro_batch_size * self.world):
            raise TrainingError(f"--batch-size {tc.batch_size} must be a positive multiple of --micro-batch-size "
                                f"{tc.micro_batch_size}" + (f" x {self.world} processes" if self.world > 1 else ""))
        if tc.dtype not in ("fp32", "bf16"):
            raise TrainingError(f"--dtype must be fp32 or bf16, got {tc.dtype!r}")
        need = estimate_step_memory(cfg, tc.micro_batch_size, tc.seq_len, world_size=self.world)
        have = _available_memory(self.device)
        if have is not None and need > 0.9 * have and self._auto_micro_batch:
            per_rank = tc.batch_size // self.world
            fits = [d for d in range(1, tc.micro_batch_size) if per_rank % d == 0
                    and estimate_step_memory(cfg, d, tc.seq_len, world_size=self.world) <= 0.9 * have]
            if fits:
                self._say(f"micro-batch {tc.micro_batch_size} -> {max(fits)} sequences of {tc.seq_len} tokens to fit "
                          f"{have / 2**30:.0f} GiB free on {self.device} (gradient accumulation keeps the batch "
                          f"of {tc.batch_size}); --micro-batch-size sets it")
                tc.micro_batch_size = max(fits)
                need = estimate_step_memory(cfg, tc.micro_batch_size, tc.seq_len, world_size=self.world)
        if have is not None and need > 0.9 * have:
            raise TrainingError(
                f"a micro-batch of {tc.micro_batch_size} x {tc.seq_len} tokens needs about {need / 2**30:.1f} GiB "
                f"(weights, optimizer, activations) but only {have / 2**30:.1f} GiB is free on {self.device}; "
                "lower --micro-batch-size (gradient accumulation keeps --batch-size) or --seq-len")

    def setup(self) -> None:
        tc = self.tc
        self._init_distributed()
        self.run_dir = run_dir = self._agree_on_run_dir()
        ckpt = None
        saved_parallel: dict[str, Any] = {}
        if tc.resume:
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                raise TrainingError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; nothing to resume")
            saved = json.loads((ckpt / "trainer_state.json").read_text())
            base = TrainConfig.from_dict(saved["train_config"])
            if tc.budget_given():  # a new budget replaces the saved one (which may be the implicit 10 minutes)
                base.max_steps = base.max_tokens = base.time_budget = None
            for name in ("max_steps", "max_tokens", "time_budget", "eval_interval", "save_interval", "keep_last",
                         "progress", "device", "compile", "price_per_hour", "gpu"):
                value = getattr(tc, name)
                if value is not None and value != getattr(TrainConfig, name, None):
                    setattr(base, name, value)
            base.out, base.resume = str(run_dir), True
            self.tc = tc = base
            self.device = self._local_device(resolve_device(tc.device))
            cfg = ModelConfig.from_pretrained(ckpt)
            saved_parallel = saved.get("parallel") or {}
            self._fit_micro_batch()
        else:
            if run_dir.exists() and latest_checkpoint(run_dir) is not None:
                raise TrainingError(f"{run_dir} already holds a run with checkpoints; pass --resume to continue it "
                                    "or choose another --out")
            cfg = self._model_config()
            self._fill_defaults(cfg)
        self._check(cfg)
        self.cfg = cfg
        self._build_dims(cfg, saved_parallel)
        if self.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
        if self.world > 1:  # rank 0 trains the tokenizer and builds the shard cache; the others reuse them
            self._rank0_first(lambda: self._prepare_data(cfg, ckpt))
        else:
            self._prepare_data(cfg, ckpt)

        torch.manual_seed(tc.seed)
        self.model = self._build_model(cfg).train()
        self.optimizer = build_optimizer(self.model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
        from leanmoe.data.shards import TokenLoader

        self.loader = TokenLoader(self.shards.train, tc.micro_batch_size, tc.seq_len, seed=tc.seed, rank=self.rank,
                                  world_size=self.world)
        self.start_state = {"step": 0, "tokens": 0, "elapsed": 0.0, "expert_load": None}
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.model, self.optimizer)
            self.loader.load_state_dict(state["loader"])
            self.start_state = state
            if self.rank == 0:
                self._truncate_metrics(state["step"])
            self._say(f"resuming {run_dir} from {ckpt.name} (step {state['step']}, {state['tokens']:,} tokens)")
        if tc.compile == "on":
            if self.world == 1:
                self._compiled_loss = torch.compile(self.model.compute_loss)
            elif not self._compile_explicit:
                self._say("distributed runs stay eager unless --compile on (which compiles attention, dense MLPs "
                          "and shared experts; untested on GPUs so far)")

    def _prepare_data(self, cfg: ModelConfig, ckpt: Path | None) -> None:
        """Tokenizer (from the checkpoint, --tokenizer, or trained here) and token shards."""
        from leanmoe.data.shards import build_shards
        from leanmoe.data.sources import resolve_sources
        from leanmoe.data.tokenizer import load_tokenizer, train_tokenizer

        tc, run_dir = self.tc, self.run_dir
        sources = resolve_sources(tc.data, stream_max_bytes=int(tc.stream_limit))
        if ckpt is not None:
            self.tokenizer = load_tokenizer(ckpt)
        elif tc.tokenizer:
            self.tokenizer = load_tokenizer(tc.tokenizer)
        elif self.rank > 0:
            self.tokenizer = load_tokenizer(run_dir)  # the one rank 0 just trained and saved
        else:
            from leanmoe.data.sources import empty_corpus_error, iter_documents

            self._say(f"training a {cfg.vocab_size}-token byte-level BPE tokenizer on "
                      f"{', '.join(s.describe() for s in sources)}")
            docs = (d for d in iter_documents(sources, None, tc.val_fraction) if d.text)
            first = next(docs, None)
            if first is None:
                raise empty_corpus_error(sources)
            # fit on training documents only (the first one may be a validation document; it is
            # only used to detect an empty corpus)
            texts = (doc.text for doc in iter_documents(sources, "train", tc.val_fraction))
            self.tokenizer = train_tokenizer(texts, cfg.vocab_size, show_progress=tc.progress)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise TrainingError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                                f"{cfg.vocab_size}; use a smaller tokenizer or a config with vocab_size >= "
                                f"{self.tokenizer.vocab_size}")
        if self.rank == 0:
            self.tokenizer.save(run_dir)
        self.shards = build_shards(sources, self.tokenizer, val_fraction=tc.val_fraction,
                                   progress=tc.progress and self.rank == 0)
        for split in ("train", "val"):
            n = len(getattr(self.shards, split))
            if n < tc.seq_len + 1:
                raise TrainingError(f"the {split} split has {n} tokens, fewer than one window of --seq-len "
                                    f"{tc.seq_len} + 1; add data or lower --seq-len")
        if self.world > 1:  # every rank needs a validation batch: fail now, not at the first evaluation
            from leanmoe.data.shards import eval_batches

            next(eval_batches(self.shards.val, tc.micro_batch_size, tc.seq_len, tc.eval_batches, rank=self.rank,
                              world_size=self.world))

    def _build_model(self, cfg: ModelConfig) -> Transformer:
        """The model on its device; parallelized (EP, FSDP2, checkpointing) in a distributed run,
        where it is built on the meta device and each rank initialises only its own shards (the
        same weights as a single-process run with the same seed)."""
        pc = self.pc
        if self.dims is None:
            model = Transformer(cfg)
            if pc.fp8_dispatch or pc.bf16_combine:
                self._say("--fp8-dispatch / --bf16-combine only change expert-parallel runs (--ep > 1); ignored")
            model = model.to(self.device)
            if pc.activation_checkpointing:
                from leanmoe.parallel.parallelize import apply_activation_checkpointing

                apply_activation_checkpointing(model)
            return model
        from leanmoe.parallel.parallelize import materialize, parallelize

        seed = int(torch.randint(0, 2**62, (), device="cpu"))  # what Transformer(cfg) would draw first
        with torch.device("meta"):
            model = Transformer(cfg)
        parallelize(model, self.dims, param_dtype=torch.bfloat16 if self.tc.dtype == "bf16" else None,
                    activation_checkpointing=pc.activation_checkpointing, fp8_dispatch=pc.fp8_dispatch,
                    combine_dtype=torch.bfloat16 if pc.bf16_combine else None,
                    compile=self._compile_explicit)
        return materialize(model, self.dims.device, seed)

    # ------------------------------------------------------------------ distributed plumbing
    def _local_device(self, device: torch.device) -> torch.device:
        if self.world == 1:
            return device
        from leanmoe.parallel.groups import local_device

        return local_device(device)

    def _init_distributed(self) -> None:
        """Join the torchrun job when launched by it (WORLD_SIZE > 1); a no-op otherwise."""
        from leanmoe.parallel import groups

        if groups.env_world_size() <= 1:
            return
        self.world = groups.env_world_size()
        self.device = self._local_device(self.device)
        self._owns_process_group = not groups.is_initialized()
        groups.init_process_group(self.device)
        self.rank = groups.rank()

    def _agree_on_run_dir(self) -> Path:
        """Rank 0 resolves the run folder (a timestamp by default) and tells the others."""
        if self.world == 1:
            return self._resolve_run_dir()
        from leanmoe.parallel.groups import broadcast_str

        chosen, error = "", None
        if self.rank == 0:
            try:
                chosen = str(self._resolve_run_dir())
            except TrainingError as e:
                error = e
        chosen = broadcast_str(chosen)
        if error is not None:
            raise error
        if not chosen:
            raise TrainingError("rank 0 could not choose the run folder (its error is above)")
        return Path(chosen)

    def _fit_micro_batch(self) -> None:
        """On resume with another number of processes, shrink the micro-batch if it no longer
        splits the (global) batch evenly over the ranks."""
        tc = self.tc
        per_rank, rem = divmod(tc.batch_size, self.world)
        if rem or per_rank == 0 or per_rank % tc.micro_batch_size == 0:
            return
        mb = max(d for d in range(1, min(tc.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
        self._say(f"micro-batch {tc.micro_batch_size} -> {mb} sequences so {self.world} processes split the batch "
                  f"of {tc.batch_size}")
        tc.micro_batch_size = mb

    def _build_dims(self, cfg: ModelConfig, saved_parallel: dict[str, Any]) -> None:
        """Choose --ep and build the (dp, ep) mesh (distributed runs only)."""
        ep = self.pc.ep
        if ep is None:  # resume with the saved layout when it still fits
            saved = saved_parallel.get("ep") or 1
            ep = saved if self.world % saved == 0 and cfg.n_routed_experts % saved == 0 else 1
        if self.world == 1:
            if ep > 1:
                raise TrainingError(f"--ep {ep} needs {ep} processes or more: launch with `leanmoe train --nproc N` "
                                    "or `torchrun --nproc-per-node N -m leanmoe train`")
            self.pc.ep = 1
            return
        from leanmoe.parallel.groups import ParallelDims

        try:
            self.dims = ParallelDims.build(ep, self.device, cfg.n_routed_experts if cfg.has_moe else None)
        except ValueError as e:
            raise TrainingError(str(e)) from e
        self.pc.ep = ep
        self._say(f"distributed: {self.dims.describe()} ({self.device.type}, "
                  f"{'NCCL' if self.device.type == 'cuda' else 'gloo'})")

    def _rank0_first(self, fn) -> None:
        """fn() on rank 0, then, if it worked, on the other ranks (they reuse what rank 0 built)."""
        from leanmoe.parallel.groups import broadcast_flag

        if self.rank == 0:
            try:
                fn()
            except BaseException:
                broadcast_flag(False)
                raise
            broadcast_flag(True)
        else:
            if not broadcast_flag(False):
                raise TrainingError("rank 0 failed while preparing the data (its error is above)")
            fn()

    def close(self) -> None:
        """Leave the process group if this trainer joined it (distributed runs)."""
        if self._owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_process_group = False

    # ------------------------------------------------------------------ helpers
    def _say(self, msg: str) -> None:
        if self.tc.progress and self.rank == 0:
            print(f"[leanmoe] {msg}", flush=True)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past the checkpoint being resumed (they will be recomputed)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash: drop it
                continue
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def _autocast(self):
        if self.tc.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, x, y):
        fn = self._compiled_loss or self.model.compute_loss
        return fn(x, y)

    def peak_flops(self) -> float | None:
        """Dense BF16 peak of the device (None on CPU/MPS or an unknown GPU)."""
        if self.device.type != "cuda":
            return None
        gpu = find_gpu(self.tc.gpu or torch.cuda.get_device_name(self.device))
        return gpu.peak_flops("bf16") if gpu else None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss (nats/token) and bits per byte over fixed windows, plus samples."""
        from leanmoe.data.shards import eval_batches

        tc, model = self.tc, self.model
        model.eval()
        token_bytes = torch.as_tensor(np.asarray(self.tokenizer.token_bytes()), device=self.device)
        nats = bpb_nats = 0.0
        count = n_bytes = 0
        # every rank evaluates its share of the same windows (at least one batch each); sums are reduced
        batches = list(eval_batches(self.shards.val, tc.micro_batch_size, tc.seq_len,
                                    max(tc.eval_batches, self.world), rank=self.rank, world_size=self.world))
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nats += loss.sum().item()
            count += loss.numel()
            b = token_bytes[y.flatten()]
            bpb_nats += (loss * (b > 0)).sum().item()  # special tokens (0 bytes) are left out
            n_bytes += int(b.sum().item())
        if self.world > 1:
            from leanmoe.parallel.groups import all_reduce_sum

            sums = all_reduce_sum(torch.tensor([nats, count, bpb_nats, n_bytes], dtype=torch.float64,
                                               device=self.device)).tolist()
            nats, count, bpb_nats, n_bytes = sums[0], int(sums[1]), sums[2], int(sums[3])
            # prompts: rank 0's first batch on every rank (decoding runs in lockstep, see sample)
            prompts = next(eval_batches(self.shards.val, tc.micro_batch_size, tc.seq_len, 1))[0]
        else:
            prompts = batches[0][0]
        samples = [self.sample(prompts[i, :8].tolist(), seed=self.tc.seed + i)
                   for i in range(min(3, prompts.shape[0]))]
        model.train()
        return {"val_loss": nats / max(count, 1), "val_bpb": bpb_nats / math.log(2) / max(n_bytes, 1),
                "samples": samples}

    @torch.no_grad()
    def sample(self, prompt: list[int], seed: int = 0, temperature: float = 0.8, top_k: int = 40) -> dict[str, str]:
        """A short seeded completion through the latent cache (absorbed MLA decode)."""
        model, n = self.model, self.tc.sample_tokens
        cache = LatentCache(self.cfg, 1, len(prompt) + n, self.device, next(model.parameters()).dtype)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.tensor([prompt], device=self.device)
        out: list[int] = []
        pos = 0
        for _ in range(n):
            logits = model(ids, position_ids=torch.arange(pos, pos + ids.shape[1], device=self.device)[None],
                           backend=cache)[0, -1].float()
            cache.advance(ids.shape[1])
            pos += ids.shape[1]
            top = logits.topk(min(top_k, logits.numel()))
            probs = (top.values / temperature).softmax(-1).cpu()
            nxt = int(top.indices[torch.multinomial(probs, 1, generator=gen)].item())
            if self.world > 1:  # every rank decodes rank 0's token, so all run the same forward passes
                from leanmoe.parallel.groups import broadcast_float

                nxt = int(broadcast_float(float(nxt)))
            if nxt == self.tokenizer.eos_id:
                break
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=self.device)
        return {"prompt": self.tokenizer.decode(prompt), "completion": self.tokenizer.decode(out)}

    # ------------------------------------------------------------------ the loop
    def _progress(self, step: int, tokens: int, elapsed: float) -> float:
        tc = self.tc
        p = [0.0]
        if tc.max_steps:
            p.append(step / tc.max_steps)
        if tc.max_tokens:
            p.append(tokens / tc.max_tokens)
        if tc.time_budget:
            p.append(elapsed / tc.time_budget)
        return max(p)

    def _state(self, step, tokens, elapsed, load_total) -> dict[str, Any]:
        return {"tokens": tokens, "elapsed": elapsed, "loader": self.loader.state_dict(),
                "train_config": self.tc.to_dict(), "expert_load": load_total.tolist() if load_total is not None else None,
                "model_summary": self.cfg.summary(), "saved_at": dt.datetime.now().isoformat(timespec="seconds"),
                "parallel": {**self.pc.to_dict(), "world_size": self.world}}

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run until the budget is spent (or `stop_after` steps in this call, for tests)."""
        if self.model is None:
            self.setup()
        tc, model, opt = self.tc, self.model, self.optimizer
        st = self.start_state
        step, tokens, elapsed0 = st["step"], st["tokens"], st["elapsed"]
        load_total = torch.tensor(st["expert_load"]) if st.get("expert_load") else None
        accum = tc.batch_size // (tc.micro_batch_size * self.world)
        tokens_per_step = tc.batch_size * tc.seq_len
        flops_per_token = self.cfg.flops_per_token(tc.seq_len)
        peak = self.peak_flops()
        peak = peak * self.world if peak else None
        metrics = open(self.run_dir / "metrics.jsonl", "a") if self.rank == 0 else None
        bar = self._progress_bar()
        t_start = time.perf_counter()

        def clock(t: float) -> float:
            """Seconds of the run at perf_counter() == t; rank 0's, so all ranks stop and schedule alike."""
            elapsed = elapsed0 + t - t_start
            if self.world == 1:
                return elapsed
            from leanmoe.parallel.groups import broadcast_float

            return broadcast_float(elapsed)

        last_ckpt = latest_checkpoint(self.run_dir)
        last_loss = last_eval = None
        interrupted = stopping = False
        # distributed: Ctrl-C / SIGTERM (torchrun forwards it) only raises a flag; the ranks agree on
        # it in the step's all-reduce, so all of them stop after the same step and save together
        signalled: list[int] = []
        old_handlers = self._install_stop_handlers(signalled) if self.world > 1 else {}
        steps_this_call = 0
        tps_history: list[float] = []
        self._say(f"run folder {self.run_dir}; model: {self.cfg.summary().splitlines()[1]}")
        self._say(f"device {self.device}, dtype {tc.dtype}, batch {tc.batch_size} x {tc.seq_len} tokens "
                  f"({accum} micro-batches" + (f" on each of {self.world} processes" if self.world > 1 else "")
                  + f"), lr {tc.lr}, budget: " + ", ".join(
                      f"{k}={v}" for k, v in (("steps", tc.max_steps), ("tokens", tc.max_tokens),
                                              ("seconds", tc.time_budget)) if v))
        try:
            # a resumed run whose budget is already spent does nothing; otherwise the loop ends at
            # the step marked final, which always evaluates and saves
            done = self._progress(step, tokens, clock(time.perf_counter())) >= 1.0
            while not done:
                t0 = time.perf_counter()
                lr = lr_at(step, self._progress(step, tokens, clock(t0)), tc.lr, tc.warmup_steps,
                           tc.schedule, tc.min_lr_ratio, tc.decay_fraction)
                for group in opt.param_groups:
                    group["lr"] = lr
                parts = torch.zeros(4, device=self.device)
                for _ in range(accum):
                    x, y = self.loader.next_batch()
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    try:
                        with self._autocast():
                            out = self._loss(x, y)
                        (out.loss / accum).backward()
                    except (torch.OutOfMemoryError, RuntimeError) as e:
                        if isinstance(e, torch.OutOfMemoryError) or "allocate" in str(e) or "out of memory" in str(e):
                            raise TrainingError(
                                f"out of memory at step {step + 1} with micro-batches of {tc.micro_batch_size} x "
                                f"{tc.seq_len} tokens; lower --micro-batch-size (gradient accumulation keeps the "
                                f"batch) or --seq-len. The last good checkpoint is {last_ckpt}") from e
                        raise
                    parts += torch.stack([out.loss, out.lm_loss, out.mtp_loss, out.aux_loss]).detach().float() / accum
                if self.world > 1:
                    from leanmoe.parallel.groups import all_reduce_sum
                    from leanmoe.parallel.parallelize import clip_grad_norm_

                    reduced = all_reduce_sum(torch.cat([parts, parts.new_tensor([1.0 if signalled else 0.0])]))
                    parts = reduced[:4] / self.world  # the global batch's mean losses
                    stopping = bool(reduced[4] > 0)  # a rank was signalled: everyone stops after this step
                    grad_norm = clip_grad_norm_(model.parameters(), tc.grad_clip)  # of the sharded gradients
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                loss, lm_loss, mtp_loss, aux_loss = parts.tolist()  # host sync: once per step, for logging
                if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                    what = "loss" if not math.isfinite(loss) else "gradient norm"
                    raise TrainingError(
                        f"the {what} became {loss if what == 'loss' else float(grad_norm)} at step {step + 1} "
                        f"(lr {lr:.3g}); lower --lr (now {tc.lr}) or raise --warmup-steps (now {tc.warmup_steps}). "
                        f"Nothing was saved from this step; the last good checkpoint is {last_ckpt}")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if self.world > 1:  # every rank moves its biases by the global load: they stay equal
                    from leanmoe.parallel.groups import all_reduce_sum

                    load = model.update_router_bias(load=all_reduce_sum(model.expert_load()))
                else:
                    load = model.update_router_bias()
                load_total = load.cpu() if load_total is None else load_total + load.cpu()
                step += 1
                steps_this_call += 1
                tokens += tokens_per_step
                step_time = time.perf_counter() - t0
                tps = tokens_per_step / step_time
                tps_history.append(tps)
                elapsed = clock(time.perf_counter())
                last_loss = loss
                mfu = flops_per_token * tps / peak if peak else None
                rec: dict[str, Any] = {
                    "step": step, "loss": loss, "lm_loss": lm_loss, "mtp_loss": mtp_loss, "aux_loss": aux_loss,
                    "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens, "tokens_per_second": tps,
                    "elapsed": elapsed, "mfu": mfu,
                    "load_max_over_mean": ((load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
                                           if load.numel() else []),  # [] for a dense model
                }
                final = self._progress(step, tokens, elapsed) >= 1.0 or stopping or (
                    stop_after is not None and steps_this_call >= stop_after)
                if (step % tc.eval_interval == 0 or final) and not stopping:
                    last_eval = self.evaluate()
                    rec.update(val_loss=last_eval["val_loss"], val_bpb=last_eval["val_bpb"])
                    self._log_eval(step, last_eval, bar)
                if metrics is not None and (step % tc.log_interval == 0 or "val_loss" in rec):
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                if step % tc.save_interval == 0 or final:
                    last_ckpt = save_checkpoint(self.run_dir, step, model, opt,
                                                self._state(step, tokens, elapsed, load_total), self.tokenizer,
                                                tc.keep_last)
                self._update_bar(bar, step, tokens, lm_loss, tps, mfu, elapsed)
                done = final
            if stopping:
                interrupted = True
                self._say(f"stopped by a signal after step {step}; saved {last_ckpt}; continue with --resume "
                          f"--out {self.run_dir}")
        except KeyboardInterrupt:
            interrupted = True
            elapsed = elapsed0 + time.perf_counter() - t_start
            if self.world > 1:  # ranks stop at different points: a collective save could hang
                self._say(f"interrupted at step {step}; the last checkpoint is {last_ckpt}; continue with "
                          f"--resume --out {self.run_dir}")
            else:
                if step > 0 and (last_ckpt is None or not last_ckpt.name.endswith(f"-{step}")):
                    last_ckpt = save_checkpoint(self.run_dir, step, model, opt,
                                                self._state(step, tokens, elapsed, load_total), self.tokenizer,
                                                tc.keep_last)
                self._say(f"interrupted at step {step}; saved {last_ckpt}; continue with --resume --out {self.run_dir}")
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if metrics is not None:
                metrics.close()
            if bar is not None:
                bar.close()
        elapsed = elapsed0 + time.perf_counter() - t_start
        tps_mean = float(np.median(tps_history)) if tps_history else 0.0
        result = TrainResult(run_dir=self.run_dir, steps=step, tokens=tokens, elapsed=elapsed, final_loss=last_loss,
                             val_loss=last_eval["val_loss"] if last_eval else None,
                             val_bpb=last_eval["val_bpb"] if last_eval else None, tokens_per_second=tps_mean,
                             checkpoint=last_ckpt, report=None, interrupted=interrupted)
        if step > 0 and self.rank == 0:
            from leanmoe.train.report import write_report

            result.report = write_report(self, result, load_total, last_eval)
            self._say(f"done: {step} steps, {tokens:,} tokens in {_fmt_eta(elapsed)}; report {result.report}")
        return result

    @staticmethod
    def _install_stop_handlers(signalled: list[int]) -> dict:
        """SIGINT and SIGTERM append to `signalled` instead of interrupting (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: signalled.append(signum))
        return old

    # ------------------------------------------------------------------ display
    def _progress_bar(self):
        if not self.tc.progress or self.rank > 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=1000, bar_format="{percentage:3.0f}%|{bar:20}| {desc}", dynamic_ncols=True)

    def _update_bar(self, bar, step, tokens, loss, tps, mfu, elapsed) -> None:
        if bar is None:
            return
        p = self._progress(step, tokens, elapsed)
        bar.n = min(1000, int(p * 1000))
        eta = elapsed * (1 - p) / p if p > 0 else float("inf")
        mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a (cpu)"
        bar.set_description_str(f"step {step} | loss {loss:.3f} | {tps:,.0f} tok/s | MFU {mfu_s} | ETA {_fmt_eta(eta)}")

    def _log_eval(self, step, ev, bar) -> None:
        lines = [f"step {step}: val_loss {ev['val_loss']:.4f}, val_bpb {ev['val_bpb']:.4f}"]
        for s in ev["samples"][:2]:
            lines.append(f"  {s['prompt']!r} -> {s['completion'][:120]!r}")
        if bar is not None:
            for line in lines:
                bar.write(line)
        elif self.tc.progress and self.rank == 0:
            print("\n".join(lines), flush=True)


def train(tc: TrainConfig, pc: ParallelConfig | None = None) -> TrainResult:
    """Run a whole training job (the library function behind `leanmoe train`); under torchrun,
    on every process, laid out by `pc`."""
    trainer = Trainer(tc, pc)
    try:
        return trainer.train()
    finally:
        trainer.close()
