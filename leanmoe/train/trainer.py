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

Where the pieces live: defaults and checks in `TrainConfig.resolved` (train/config.py), the
memory estimate in train/memory.py, validation and samples in train/evaluate.py, the progress
line and report.md in train/report.py, checkpoints in train/run_checkpoint.py, FP8 conversion in
train/fp8.py. Launched by torchrun (WORLD_SIZE > 1) the same loop runs distributed through a
`leanmoe.parallel.world.World`: the model is parallelized (expert parallelism over --ep ranks,
FSDP2 over all), --batch-size is the global batch and each rank draws its own share of it;
losses, expert loads, gradient norms and evaluation sums are reduced across ranks so every rank
takes the same decisions (and holds the same router biases); the clock that budgets and
schedules use is rank 0's; only rank 0 prints and writes metrics, the report and checkpoint
files (every rank helps gather the full checkpoint). In one process the World's collectives
return their input, so the loop below has no distributed branches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanmoe.config import ModelConfig
from leanmoe.data.loader import TokenLoader
from leanmoe.device import resolve_device
from leanmoe.model import Transformer
from leanmoe.parallel.config import ParallelConfig
from leanmoe.parallel.world import World
from leanmoe.train.config import TrainConfig, TrainingError
from leanmoe.train.cost import find_gpu
from leanmoe.train.data import prepare_data
from leanmoe.train.evaluate import evaluate
from leanmoe.train.memory import available_memory, retain_cpu_heap
from leanmoe.train.optim import build_optimizer, lr_at
from leanmoe.train.report import ProgressDisplay, RunSummary, TrainResult, device_name, fmt_eta, write_report
from leanmoe.train.run_checkpoint import (latest_checkpoint, latest_intact_checkpoint, load_checkpoint,
                                          read_trainer_state, save_checkpoint)
from leanmoe.train.run_folder import check_run_folder, create_run_folder, remove_if_unused, truncate_metrics

__all__ = ["Trainer", "TrainResult", "TrainingError", "train"]

# what a run is: a resumed run keeps these (its loader, tokenizer and weights depend on them)
RESUME_FIXED = ("preset", "config", "data", "tokenizer", "val_fraction", "stream_limit", "seed", "fp8", "mtp_weight",
                "mtp_layers", "bias_update_speed", "expert_lr_scale")


@dataclass
class RunState:
    """The counters the loop advances and a checkpoint saves."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds of the run, rank 0's clock, across resumes
    load_total: torch.Tensor | None = None  # [n_moe_layers, E] tokens per expert so far
    last_loss: float | None = None
    last_eval: dict[str, Any] | None = None
    last_ckpt: Path | None = None
    step_tps: list[float] = field(default_factory=list)  # tokens/s of each step this process took


class Trainer:
    """Build with a TrainConfig (and a ParallelConfig for distributed launches), then `train()`.
    `setup()` (called by `train()`) resolves the config, prepares data and model; after it
    `self.tc` is the resolved config. See the module docstring for the run layout."""

    def __init__(self, tc: TrainConfig, pc: ParallelConfig | None = None):
        self.tc = tc
        self.pc = dataclasses.replace(pc) if pc is not None else ParallelConfig()
        self.world: World | None = None
        self.device: torch.device | None = None
        self.display = ProgressDisplay(tc.progress)
        self.run_dir: Path | None = None
        self.cfg: ModelConfig | None = None
        self.model: Transformer | None = None
        self.tokenizer = None
        self.shards = None
        self.state: RunState | None = None
        self.start_state: dict[str, Any] | None = None  # step, tokens, elapsed where training (re)starts
        self._compiled_loss = None
        self._compile_explicit = tc.compile == "on"  # --compile on, not the GPU default
        self._mfu_per_tps: float | None = None  # MFU of 1 token/s (None on CPU/MPS: no peak to compare)
        self._created_run_dir = False
        self.cpu_heap: str | None = None  # what retain_cpu_heap() did (CPU runs)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        tc = self.tc
        self.device = self._device(tc.device)
        try:
            self.world = world = World.join(self.device, self.pc.timeout_s)
        except ValueError as e:
            raise TrainingError(str(e)) from e
        self.device = world.device
        if self.device.type == "cpu":  # same activations every step: keep their pages (see retain_cpu_heap)
            try:
                self.cpu_heap = retain_cpu_heap()
            except ValueError as e:
                raise TrainingError(str(e)) from e
        self.display.enabled, self.display.rank0 = tc.progress and world.is_rank0, world.is_rank0
        self.run_dir = run_dir = Path(world.rank0_value(
            lambda: str(self._choose_run_dir()), TrainingError("rank 0 could not use the run folder (its error is above)")))
        ckpt = latest_intact_checkpoint(run_dir, self.display.warn) if tc.resume else None
        saved_parallel: dict[str, Any] = {}
        if tc.resume:
            if ckpt is None:
                raise TrainingError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; nothing to resume")
            tc, saved_parallel = self._resumed_config(ckpt)
            self.device = world.local_device(self._device(tc.device))
            cfg = ModelConfig.from_pretrained(ckpt)
        else:
            cfg = self._model_config()
        self.tc = tc = tc.resolved(cfg, self.device, world.size, available_memory(self.device), self.display.say,
                                   self.display.warn)
        self.cfg = cfg
        self._build_mesh(cfg, saved_parallel)
        if world.is_rank0:
            self._created_run_dir = create_run_folder(run_dir, tc.resume)
        # rank 0 trains the tokenizer and builds the shard cache; the others reuse them
        world.rank0_first(lambda: self._prepare_data(cfg, ckpt),
                          TrainingError("rank 0 failed while preparing the data (its error is above)"))

        torch.manual_seed(tc.seed)
        self.model = self._build_model(cfg).train()
        peak = self.peak_flops()
        self._mfu_per_tps = cfg.flops_per_token(tc.seq_len) / (peak * world.size) if peak else None
        self.optimizer = build_optimizer(self.model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2),
                                         expert_lr_scale=tc.expert_lr_scale)
        self.loader = TokenLoader(self.shards.train, tc.micro_batch_size, tc.seq_len, seed=tc.seed, rank=world.rank,
                                  world_size=world.size)
        self.state = RunState(last_ckpt=ckpt)
        if ckpt is not None:
            saved = load_checkpoint(ckpt, self.model, self.optimizer)
            self.loader.load_state_dict(saved["loader"])
            self.state = RunState(step=saved["step"], tokens=saved["tokens"], elapsed=saved["elapsed"], last_ckpt=ckpt,
                                  load_total=torch.tensor(saved["expert_load"]) if saved.get("expert_load") else None)
            if world.is_rank0:
                truncate_metrics(run_dir, saved["step"])
            self.display.say(f"resuming {run_dir} from {ckpt.name} (step {saved['step']}, {saved['tokens']:,} tokens)")
        self.start_state = {"step": self.state.step, "tokens": self.state.tokens, "elapsed": self.state.elapsed}
        if tc.compile == "on":
            if not world.distributed:
                self._compiled_loss = torch.compile(self.model.compute_loss)
            elif not self._compile_explicit:
                self.display.say("distributed runs stay eager unless --compile on (which compiles attention, dense "
                                 "MLPs and shared experts; untested on GPUs so far)")

    def _device(self, name: str) -> torch.device:
        try:
            return resolve_device(name)
        except ValueError as e:
            raise TrainingError(str(e)) from e

    def _choose_run_dir(self) -> Path:
        run_dir = self._default_run_dir()
        check_run_folder(run_dir, self.tc.resume)
        return run_dir

    def _default_run_dir(self) -> Path:
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
        if tc.mtp_layers is not None:
            if not (isinstance(tc.mtp_layers, int) and 0 <= tc.mtp_layers <= 8):
                raise TrainingError(f"--mtp-layers {tc.mtp_layers}: must be a whole number from 0 to 8")
            changes["num_nextn_predict_layers"] = tc.mtp_layers
        if tc.bias_update_speed is not None:
            changes["bias_update_speed"] = tc.bias_update_speed
        cfg = cfg.replace(**changes) if changes else cfg
        if tc.mtp_weight and not cfg.num_nextn_predict_layers:
            raise TrainingError(f"--mtp-weight {tc.mtp_weight}: the model has no MTP module (num_nextn_predict_layers "
                                "is 0); add one with --mtp-layers 1")
        return cfg

    def _resumed_config(self, ckpt: Path) -> tuple[TrainConfig, dict[str, Any]]:
        """The run's saved config, with what may change on resume (budget, schedule, batch, device,
        ...) taken from the given one and each change said; and the saved parallel layout. What the
        run is (model, data, tokenizer, seed, FP8) cannot change: TrainingError."""
        tc = self.tc
        saved = read_trainer_state(ckpt)
        base = TrainConfig.from_dict(saved["train_config"])
        if tc.budget_given():  # a new budget replaces the saved one (which may be the implicit 10 minutes)
            base.max_steps = base.max_tokens = base.time_budget = None
        defaults = TrainConfig()
        for f in dataclasses.fields(TrainConfig):
            value, old = getattr(tc, f.name), getattr(base, f.name)
            if f.name in ("out", "resume", "extra") or value is None or value == getattr(defaults, f.name) \
                    or value == old:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.name in RESUME_FIXED:
                raise TrainingError(f"--resume: {flag} {value} differs from the run's ({old}); a resumed run keeps "
                                    "its model, data, tokenizer, seed and precision; start a new run with another --out")
            setattr(base, f.name, value)
            if f.name not in ("progress", "device", "compile", "gpu", "price_per_hour", "keep_last") and old is not None:
                self.display.say(f"resume: {flag} {old} -> {value} (applied)")
        base.out, base.resume = str(self.run_dir), True
        return base.for_world(self.world.size, self.display.say), saved.get("parallel") or {}

    def _prepare_data(self, cfg: ModelConfig, ckpt: Path | None) -> None:
        source = ckpt or self.tc.tokenizer or (self.run_dir if not self.world.is_rank0 else None)
        self.tokenizer, self.shards = prepare_data(self.tc, cfg, self.run_dir, source, self.world, self.display.say)

    def _build_mesh(self, cfg: ModelConfig, saved_parallel: dict[str, Any]) -> None:
        """Choose --ep and build the (dp, ep) mesh (distributed runs only)."""
        ep, world = self.pc.ep, self.world
        if ep is None:  # resume with the saved layout when it still fits
            saved = saved_parallel.get("ep") or 1
            ep = saved if world.size % saved == 0 and cfg.n_routed_experts % saved == 0 else 1
        if not world.distributed and ep > 1:
            raise TrainingError(f"--ep {ep} needs {ep} processes or more: launch with `leanmoe train --nproc N` "
                                "or `torchrun --nproc-per-node N -m leanmoe train`")
        try:
            world.build_mesh(ep, cfg.n_routed_experts if cfg.has_moe else None)
        except ValueError as e:
            raise TrainingError(str(e)) from e
        self.pc.ep = ep
        if world.distributed:
            self.display.say(f"distributed: {world.describe()} ({self.device.type}, "
                             f"{'NCCL' if self.device.type == 'cuda' else 'gloo'})")

    def _build_model(self, cfg: ModelConfig) -> Transformer:
        """The model on its device, converted to FP8 with --fp8; parallelized (EP, FSDP2,
        checkpointing) in a distributed run, where it is built on the meta device and each rank
        initialises only its own shards (the same weights as a single-process run with the same seed)."""
        from leanmoe.parallel.parallelize import apply_activation_checkpointing, materialize, parallelize

        tc, pc, dims = self.tc, self.pc, self.world.dims
        if dims is None:
            model = self._maybe_fp8(Transformer(cfg)).to(self.device)
            if pc.fp8_dispatch or pc.bf16_combine:
                self.display.say("--fp8-dispatch / --bf16-combine only change expert-parallel runs (--ep > 1); ignored")
            if pc.activation_checkpointing:
                apply_activation_checkpointing(model)
            return model
        seed = int(torch.randint(0, 2**62, (), device="cpu"))  # what Transformer(cfg) would draw first
        with torch.device("meta"):
            model = self._maybe_fp8(Transformer(cfg))
        parallelize(model, dims, param_dtype=torch.bfloat16 if tc.dtype == "bf16" else None,
                    activation_checkpointing=pc.activation_checkpointing, fp8_dispatch=pc.fp8_dispatch,
                    combine_dtype=torch.bfloat16 if pc.bf16_combine else None, compile=self._compile_explicit)
        return materialize(model, dims.device, seed)

    def _maybe_fp8(self, model: Transformer) -> Transformer:
        if not self.tc.fp8:
            return model
        from leanmoe.train.fp8 import convert_to_fp8  # lazy: triton loads only for FP8 runs

        return convert_to_fp8(model)

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run until the budget is spent. With `stop_after`, pause after that many steps of this call
        (result.paused; no final evaluation or report): the next call continues the same run, whose
        clock counts only the time spent inside train(), so two runs can share a machine in turns.
        A run that fails before it has anything to show removes the run folder it created."""
        try:
            return self._train(stop_after)
        except BaseException:
            if self._created_run_dir and remove_if_unused(self.run_dir):
                self.display.say(f"removed {self.run_dir}: the run failed before it had anything to keep")
            raise

    def _train(self, stop_after: int | None) -> TrainResult:
        if self.model is None:
            self.setup()
        tc, s, world = self.tc, self.state, self.world
        t_start, elapsed0 = time.perf_counter(), s.elapsed
        # rank 0's clock, so every rank stops and schedules alike
        clock = lambda: world.broadcast_float(elapsed0 + time.perf_counter() - t_start)  # noqa: E731
        metrics = open(self.run_dir / "metrics.jsonl", "a") if world.is_rank0 else None
        if s.step == self.start_state["step"]:  # not when a paused run continues
            self._announce()
        self.display.open()
        interrupted = stopping = paused = False
        steps, tps_history = 0, s.step_tps
        try:
            with world.stop_on_signals() as signalled:
                # a resumed run whose budget is already spent does nothing; otherwise the loop ends
                # at the step marked final, which always evaluates and saves
                done = self._progress(s.step, s.tokens, elapsed0) >= 1.0  # a paused run had budget left
                while not done:
                    lr = lr_at(s.step, self._progress(s.step, s.tokens, clock()), tc.lr, tc.warmup_steps,
                               tc.schedule, tc.min_lr_ratio, tc.decay_fraction)
                    rec, stopping = self._step(lr, signalled)
                    steps += 1
                    tps_history.append(rec["tokens_per_second"])
                    rec["elapsed"] = s.elapsed = clock()
                    final = self._progress(s.step, s.tokens, s.elapsed) >= 1.0 or stopping
                    paused = not final and stop_after is not None and steps >= stop_after
                    if (s.step % tc.eval_interval == 0 or final) and not stopping:
                        s.last_eval = self.evaluate()
                        rec.update(val_loss=s.last_eval["val_loss"], val_bpb=s.last_eval["val_bpb"])
                        self.display.evaluation(s.step, s.last_eval)
                    if metrics is not None and (s.step % tc.log_interval == 0 or "val_loss" in rec):
                        metrics.write(json.dumps(rec) + "\n")
                        metrics.flush()
                    if s.step % tc.save_interval == 0 or final:
                        self._save()
                    self.display.update(self._progress(s.step, s.tokens, s.elapsed), s.step, rec["lm_loss"],
                                        rec["tokens_per_second"], rec["mfu"], s.elapsed)
                    if paused:  # its evaluation counts, as in the next step's time; if that spent the
                        s.elapsed = clock()  # budget, one more step ends the run, as in one call
                        paused = self._progress(s.step, s.tokens, s.elapsed) < 1.0
                    done = final or paused
            if stopping:
                interrupted = True
                self.display.say(f"stopped by a signal after step {s.step}; saved {s.last_ckpt}; continue with "
                                 f"--resume --out {self.run_dir}")
        except KeyboardInterrupt:
            interrupted = True
            s.elapsed = elapsed0 + time.perf_counter() - t_start
            self._save_on_interrupt()
        finally:
            if metrics is not None:
                metrics.close()
            self.display.close()
        return self._finish(elapsed0 + time.perf_counter() - t_start, tps_history, interrupted, paused)

    def _step(self, lr: float, signalled: list[int]) -> tuple[dict[str, Any], bool]:
        """One optimizer step at learning rate `lr`: accumulated forward/backward, all-reduce of the
        losses (and of the stop flag), clipping, AdamW, router-bias update. Returns the metrics
        record and whether some rank was signalled to stop."""
        tc, s, model, opt, world = self.tc, self.state, self.model, self.optimizer, self.world
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        accum = tc.batch_size // (tc.micro_batch_size * world.size)
        parts = torch.zeros(4, device=self.device)
        for _ in range(accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            try:
                with self._autocast():
                    out = (self._compiled_loss or model.compute_loss)(x, y)
                (out.loss / accum).backward()
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if isinstance(e, torch.OutOfMemoryError) or "allocate" in str(e) or "out of memory" in str(e):
                    raise TrainingError(
                        f"out of memory at step {s.step + 1} with micro-batches of {tc.micro_batch_size} x "
                        f"{tc.seq_len} tokens; lower --micro-batch-size (gradient accumulation keeps the "
                        f"batch) or --seq-len. The last good checkpoint is {s.last_ckpt}") from e
                raise
            parts += torch.stack([out.loss, out.lm_loss, out.mtp_loss, out.aux_loss]).detach().float() / accum
        # the global batch's mean losses, and whether any rank was signalled (it stops after this step)
        reduced = world.all_reduce_sum(torch.cat([parts, parts.new_tensor([1.0 if signalled else 0.0])]))
        stopping = bool(reduced[4] > 0)
        grad_norm = world.clip_grad_norm_(model.parameters(), tc.grad_clip)
        loss, lm_loss, mtp_loss, aux_loss = (reduced[:4] / world.size).tolist()  # host sync: once per step
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise TrainingError(
                f"the {what} became {loss if what == 'loss' else float(grad_norm)} at step {s.step + 1} "
                f"(lr {lr:.3g}); lower --lr (now {tc.lr}) or raise --warmup-steps (now {tc.warmup_steps}). "
                f"Nothing was saved from this step; the last good checkpoint is {s.last_ckpt}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        # every rank moves its biases by the global load, so they stay equal
        load = model.update_router_bias(load=world.all_reduce_sum(model.expert_load()))
        s.load_total = load.cpu() if s.load_total is None else s.load_total + load.cpu()
        s.step += 1
        s.tokens += tc.batch_size * tc.seq_len
        s.last_loss = loss
        tps = tc.batch_size * tc.seq_len / (time.perf_counter() - t0)
        return {
            "step": s.step, "loss": loss, "lm_loss": lm_loss, "mtp_loss": mtp_loss, "aux_loss": aux_loss,
            "lr": lr, "grad_norm": float(grad_norm), "tokens": s.tokens, "tokens_per_second": tps,
            "elapsed": None, "mfu": tps * self._mfu_per_tps if self._mfu_per_tps else None,
            "load_max_over_mean": ((load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
                                   if load.numel() else []),  # [] for a dense model
        }, stopping

    def _progress(self, step: int, tokens: int, elapsed: float) -> float:
        """How much of the budget is spent: the largest of the step, token and time fractions."""
        tc = self.tc
        p = [0.0]
        if tc.max_steps:
            p.append(step / tc.max_steps)
        if tc.max_tokens:
            p.append(tokens / tc.max_tokens)
        if tc.time_budget:
            p.append(elapsed / tc.time_budget)
        return max(p)

    # ------------------------------------------------------------------ saving and reporting
    def _save(self) -> None:
        s, tc = self.state, self.tc
        state = {"tokens": s.tokens, "elapsed": s.elapsed, "loader": self.loader.state_dict(),
                 "train_config": tc.to_dict(), "expert_load": s.load_total.tolist() if s.load_total is not None else None,
                 "model_summary": self.cfg.summary(), "saved_at": dt.datetime.now().isoformat(timespec="seconds"),
                 "parallel": {**self.pc.to_dict(), "world_size": self.world.size}}
        s.last_ckpt = save_checkpoint(self.run_dir, s.step, self.model, self.optimizer, state, self.tokenizer,
                                      tc.keep_last)

    def _save_on_interrupt(self) -> None:
        """Ctrl-C: one process saves the step it finished (unless just saved); ranks of a distributed
        run stop at different points, where a collective save could hang, so they only say where to resume."""
        s = self.state
        if not self.world.distributed and s.step > 0 and (s.last_ckpt is None
                                                          or not s.last_ckpt.name.endswith(f"-{s.step}")):
            self._save()
            what = f"saved {s.last_ckpt}"
        else:
            what = f"{'the last checkpoint is' if self.world.distributed else 'saved'} {s.last_ckpt}"
        self.display.say(f"interrupted at step {s.step}; {what}; continue with --resume --out {self.run_dir}")

    def _finish(self, elapsed: float, tps_history: list[float], interrupted: bool, paused: bool) -> TrainResult:
        s, ev = self.state, self.state.last_eval
        result = TrainResult(run_dir=self.run_dir, steps=s.step, tokens=s.tokens, elapsed=elapsed,
                             final_loss=s.last_loss, val_loss=ev["val_loss"] if ev else None,
                             val_bpb=ev["val_bpb"] if ev else None,
                             tokens_per_second=float(np.median(tps_history)) if tps_history else 0.0,
                             checkpoint=s.last_ckpt, report=None, interrupted=interrupted, paused=paused)
        if s.step > 0 and self.world.is_rank0 and not paused:
            summary = self.summary(result)
            if self.tc.eval_tasks and s.last_ckpt is not None and not interrupted:
                summary.harness = self._harness(s.last_ckpt)
            result.report = write_report(summary, self.run_dir)
            self.display.say(f"done: {s.step} steps, {s.tokens:,} tokens in {fmt_eta(elapsed)}; report {result.report}")
        return result

    def _harness(self, ckpt: Path) -> dict[str, Any]:
        """lm-eval's results for --eval-tasks on the final checkpoint (read back from disk, so a
        distributed run's full model is scored on rank 0)."""
        from leanmoe.infer.harness import evaluate as harness_evaluate

        self.display.say(f"lm-eval: {', '.join(self.tc.eval_tasks)} on {ckpt.name}")
        res = harness_evaluate(ckpt, self.tc.eval_tasks, limit=self.tc.eval_limit,
                               include_path=self.tc.eval_include_path, device=str(self.device))
        return (res or {}).get("results", {})

    def summary(self, result: TrainResult) -> RunSummary:
        """The plain value report.md is written from."""
        cuda = self.device.type == "cuda"
        return RunSummary(train_config=self.tc, model_config=self.cfg, result=result, world_size=self.world.size,
                          device_type=self.device.type, device_name=device_name(self.device), gpu=self._gpu(),
                          peak_memory_gib=torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
                          load_total=self.state.load_total, last_eval=self.state.last_eval)

    def _announce(self) -> None:
        tc, world = self.tc, self.world
        accum = tc.batch_size // (tc.micro_batch_size * world.size)
        self.display.say(f"run folder {self.run_dir}; model: {self.cfg.summary().splitlines()[1]}")
        heap = f" ({self.cpu_heap})" if self.cpu_heap else ""
        self.display.say(
            f"device {self.device}{heap}, dtype {tc.dtype}, batch {tc.batch_size} x {tc.seq_len} tokens ({accum} micro-batches"
            + (f" on each of {world.size} processes" if world.distributed else "") + f"), lr {tc.lr}, budget: "
            + ", ".join(f"{k}={v}" for k, v in (("steps", tc.max_steps), ("tokens", tc.max_tokens),
                                                ("seconds", tc.time_budget)) if v))

    # ------------------------------------------------------------------ helpers
    def evaluate(self, max_batches: int | None = None) -> dict[str, Any]:
        """Validation loss (nats/token) and bits per byte over fixed windows (the first
        `max_batches` batches, default --eval-batches), plus samples."""
        tc = self.tc
        return evaluate(self.model, self.tokenizer, self.shards.val, batch_size=tc.micro_batch_size,
                        seq_len=tc.seq_len, max_batches=max_batches or tc.eval_batches,
                        sample_tokens=tc.sample_tokens, seed=tc.seed,
                        device=self.device, world=self.world, autocast=self._autocast)

    def _autocast(self):
        if self.tc.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _gpu(self):
        return find_gpu(self.tc.gpu or torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None

    def peak_flops(self) -> float | None:
        """Dense BF16 peak of one device (None on CPU/MPS or an unknown GPU)."""
        gpu = self._gpu()
        return gpu.peak_flops("bf16") if gpu else None

    def close(self) -> None:
        """Leave the process group if this trainer joined it (distributed runs)."""
        if self.world is not None:
            self.world.close()


def train(tc: TrainConfig, pc: ParallelConfig | None = None) -> TrainResult:
    """Run a whole training job (the library function behind `leanmoe train`); under torchrun,
    on every process, laid out by `pc`."""
    trainer = Trainer(tc, pc)
    try:
        return trainer.train()
    finally:
        trainer.close()
