"""TrainConfig: every knob of a training run, as data (the CLI fills it; Python users build it).

`TrainConfig.resolved(model_cfg, device)` returns a copy with the device-dependent defaults
filled in and every value checked (like `EngineConfig.resolved` for serving); the caller's
config is never changed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from leanmoe.config import ModelConfig

__all__ = ["TrainConfig", "TrainingError", "parse_duration"]


# warmup steps when the budget is wall-clock (a step budget warms up over 5% of its steps). 100
# rather than 50: at tiny's ~500 CPU steps in 10 minutes it ended 0.008 (MoE) and 0.022 (dense
# twin) val bits/byte lower at equal steps (docs/benchmarks.md, session 13)
TIME_BUDGET_WARMUP_STEPS = 100

SCHEDULES = ("cosine", "wsd", "constant")  # the learning-rate schedules train.optim.lr_at knows


class TrainingError(RuntimeError):
    """A run cannot continue; the message says why and what to change. Checkpoints are kept."""


def parse_duration(text: str | float | int) -> float:
    """'10m' -> 600.0 seconds; '90s', '1.5h', '1h30m' and plain seconds also accepted."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"[0-9]*\.?[0-9]+", s):
        return float(s)
    parts = re.findall(r"([0-9]*\.?[0-9]+)\s*(h|m|s)", s)
    if not parts or "".join(f"{a}{b}" for a, b in parts) != s.replace(" ", ""):
        raise ValueError(f"cannot read {text!r} as a duration; write e.g. 10m, 90s, 1.5h or 1h30m")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)


# defaults that changed, as they were before: a config saved without the key ran under these
_FORMER_DEFAULTS: dict[str, Any] = {"expert_lr_scale": 1.0, "schedule": "cosine", "decay_fraction": 0.2}


@dataclass
class TrainConfig:
    """A training run. None means "choose a sensible default for the device" (see `resolved`)."""

    # model and data
    preset: str = "tiny"
    config: str | None = None  # an HF config.json (or folder); overrides the preset
    data: list[str] | None = None  # corpus sources; None: the Python standard library
    tokenizer: str | None = None  # reuse this tokenizer.json instead of training one
    val_fraction: float = 0.02
    stream_limit: float = 1e9  # UTF-8 bytes read from each streamed (hf:) source
    out: str | None = None  # run folder; default runs/<timestamp>

    # budget: whichever ends first; none given -> time_budget of 10 minutes
    max_steps: int | None = None
    max_tokens: float | None = None
    time_budget: float | None = None  # seconds

    # batch
    seq_len: int | None = None
    batch_size: int | None = None  # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward pass (gradient accumulation)

    # optimisation
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    # cosine | wsd | constant. wsd (flat after the warm-up, the last `decay_fraction` decaying) trained
    # both `tiny` and its dense twin to lower loss than cosine at equal steps (docs/benchmarks.md)
    schedule: str = "wsd"
    # wsd only. 0.35 rather than 0.2: both models ended 0.007-0.009 lower on two seeds at equal steps
    # (docs/benchmarks.md, session 15)
    decay_fraction: float = 0.35
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float | None = None  # None: the model config's mtp_loss_weight
    mtp_layers: int | None = None  # MTP modules; None: the model config's num_nextn_predict_layers
    fp8: bool = False  # convert linear layers and experts to fine-grained FP8 after building the model
    bias_update_speed: float | None = None  # None: the model config's
    # the routed experts' learning rate, as a multiple of lr. Each expert sees only top-k / n_experts of
    # the tokens; half the rate ended tiny 0.004-0.006 val bits/byte lower at equal steps on CPU (0.35:
    # 0.005 worse than 0.5; 2: 0.05 worse). The 10-minute study with it: docs/benchmarks.md, session 12
    expert_lr_scale: float = 0.5

    # evaluation, checkpoints, logging
    eval_interval: int | None = None
    eval_batches: int = 8
    sample_tokens: int = 48
    save_interval: int | None = None
    keep_last: int = 3
    log_interval: int = 1
    progress: bool = True
    eval_tasks: list[str] | None = None  # lm-eval tasks scored on the final checkpoint for report.md
    eval_limit: float | None = None  # documents per task (a fraction if < 1)
    eval_include_path: str | None = None  # a folder of extra lm-eval task YAMLs

    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps (leanmoe.device)
    dtype: str = "auto"  # auto (bf16 autocast on GPU and native-bf16 CPUs, fp32 elsewhere) | fp32 | bf16
    compile: str = "auto"  # auto (on for CUDA) | on | off
    resume: bool = False

    # cost report
    gpu: str | None = None  # price/peak table entry; default: detected from the device
    price_per_hour: float | None = None

    extra: dict[str, Any] = field(default_factory=dict)

    def budget_given(self) -> bool:
        return any(x is not None for x in (self.max_steps, self.max_tokens, self.time_budget))

    def resolved(self, cfg: ModelConfig, device: torch.device, world_size: int = 1,
                 free_memory: int | None = None, say: Callable[[str], None] | None = None,
                 warn: Callable[[str], None] | None = None) -> TrainConfig:
        """A copy with every None filled in for this model, device and number of processes, then
        checked; raises TrainingError naming the flag. A micro-batch left to the default shrinks
        (gradient accumulation keeps the batch) until a step fits `free_memory` bytes; an
        explicit one that does not fit is refused. `warn` hears of settings that work but cost a lot
        (bf16 on a CPU that emulates it)."""
        from leanmoe.device import auto_train_dtype, cpu_has_native_bf16, dtype_name
        from leanmoe.train.memory import HEADROOM, estimate_step_memory, largest_fitting_micro_batch

        tc, gpu = dataclasses.replace(self), device.type == "cuda"
        if tc.seq_len is None:
            tc.seq_len = min(2048 if gpu else 256, cfg.max_position_embeddings)
        if tc.batch_size is None:
            tc.batch_size = (32 if gpu else 16) * world_size  # the global batch
        auto_micro_batch = tc.micro_batch_size is None
        if auto_micro_batch:  # per rank
            tc.micro_batch_size = max(1, tc.batch_size // world_size)
        if tc.lr is None:
            # 3e-3 at the tiny width (best of 1.25e-3 / 3e-3 / 5e-3 in 3-minute CPU runs), falling
            # as hidden^-0.78 to DeepSeek-V3's own 2.2e-4 at hidden 7168
            tc.lr = float(f"{3e-3 * (256 / cfg.hidden_size) ** 0.78:.2g}")
        if not tc.budget_given():
            tc.time_budget = 600.0
        if tc.warmup_steps is None:
            tc.warmup_steps = (max(1, min(100, int(0.05 * tc.max_steps))) if tc.max_steps
                               else TIME_BUDGET_WARMUP_STEPS)
        if tc.eval_interval is None:
            tc.eval_interval = max(1, min(100, tc.max_steps // 5)) if tc.max_steps else 100
        if tc.save_interval is None:
            tc.save_interval = 2 * tc.eval_interval
        try:
            tc.dtype = dtype_name(tc.dtype, allowed=("fp32", "bf16"))
        except ValueError as e:
            raise TrainingError(f"--dtype must be fp32 or bf16, got {tc.dtype!r}") from e
        if tc.dtype == "auto":  # multi-process CPU runs stay fp32: bf16 was measured in one process only
            tc.dtype = auto_train_dtype(device) if gpu or world_size == 1 else "fp32"
        elif tc.dtype == "bf16" and device.type == "cpu" and warn is not None and not cpu_has_native_bf16():
            warn("--dtype bf16 on a CPU without AVX512-BF16 or AMX: torch emulates bf16 here, and `tiny` trained "
                 "17x slower than in fp32 on an AVX2 CPU; --dtype auto picks fp32 on this machine")
        if tc.compile == "auto":
            tc.compile = "on" if gpu else "off"

        tc.check_values(world_size)
        if tc.seq_len > cfg.max_position_embeddings:
            raise TrainingError(
                f"--seq-len {tc.seq_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings}); "
                f"use --seq-len {cfg.max_position_embeddings} or less, or a config with longer positions")
        if tc.seq_len < 2:
            raise TrainingError(f"--seq-len must be at least 2, got {tc.seq_len}")
        if tc.batch_size < 1 or tc.micro_batch_size < 1 or tc.batch_size % (tc.micro_batch_size * world_size):
            raise TrainingError(f"--batch-size {tc.batch_size} must be a positive multiple of --micro-batch-size "
                                f"{tc.micro_batch_size}" + (f" x {world_size} processes" if world_size > 1 else ""))
        if free_memory is None:
            return tc
        need = estimate_step_memory(cfg, tc.micro_batch_size, tc.seq_len, world_size=world_size)
        if need > HEADROOM * free_memory and auto_micro_batch:
            mb = largest_fitting_micro_batch(cfg, tc.batch_size // world_size, tc.micro_batch_size, tc.seq_len,
                                             free_memory, world_size)
            if mb is not None:
                if say is not None:
                    say(f"micro-batch {tc.micro_batch_size} -> {mb} sequences of {tc.seq_len} tokens to fit "
                        f"{free_memory / 2**30:.0f} GiB free on {device} (gradient accumulation keeps the batch "
                        f"of {tc.batch_size}); --micro-batch-size sets it")
                tc.micro_batch_size = mb
                need = estimate_step_memory(cfg, mb, tc.seq_len, world_size=world_size)
        if need > HEADROOM * free_memory:
            raise TrainingError(
                f"a micro-batch of {tc.micro_batch_size} x {tc.seq_len} tokens needs about {need / 2**30:.1f} GiB "
                f"(weights, optimizer, activations) but only {free_memory / 2**30:.1f} GiB is free on {device}; "
                "lower --micro-batch-size (gradient accumulation keeps --batch-size) or --seq-len")
        return tc

    def check_values(self, world_size: int = 1) -> None:
        """Values no run can use (given, or filled in): TrainingError naming the flag."""
        def bad(flag: str, value, want: str) -> TrainingError:
            return TrainingError(f"--{flag} {value}: {want}")

        for name in ("max_steps", "eval_interval", "save_interval", "log_interval", "keep_last", "eval_batches"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(name.replace("_", "-"), v, "must be a whole number >= 1")
        for name in ("max_tokens", "time_budget"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise bad(name.replace("_", "-"), v, "must be a positive finite number")
        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr < 10):
            raise bad("lr", self.lr, "must be a positive finite learning rate below 10 (AdamW's are ~1e-4 to 1e-2)")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise bad("warmup-steps", self.warmup_steps, "must be a whole number >= 0")
        checks = (("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
                  ("decay_fraction", 0 <= self.decay_fraction <= 1, "must be in [0, 1]"),
                  ("val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1)"),
                  ("weight_decay", 0 <= self.weight_decay < 10, "must be in [0, 10)"),
                  ("expert_lr_scale", math.isfinite(self.expert_lr_scale) and 0 < self.expert_lr_scale <= 100,
                   "must be a positive multiple of --lr, at most 100"),
                  ("grad_clip", 0 < self.grad_clip < math.inf, "must be a positive finite number"),
                  ("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)"),
                  ("mtp_weight", self.mtp_weight is None or (math.isfinite(self.mtp_weight) and self.mtp_weight >= 0),
                   "must be a finite number >= 0"),
                  ("price_per_hour", self.price_per_hour is None
                   or (math.isfinite(self.price_per_hour) and self.price_per_hour >= 0), "must be a finite number >= 0"),
                  ("seed", isinstance(self.seed, int) and self.seed >= 0, "must be a whole number >= 0"))
        for name, ok, want in checks:
            if not ok:
                raise bad(name.replace("_", "-"), getattr(self, name), want)
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"must be one of {', '.join(SCHEDULES)}")
        if self.compile not in ("auto", "on", "off"):
            raise bad("compile", self.compile, "must be auto, on or off")

    def for_world(self, world_size: int, say: Callable[[str], None] | None = None) -> TrainConfig:
        """A saved (resolved) config for resuming on `world_size` processes: the micro-batch shrinks
        if it no longer splits the global batch evenly over the ranks."""
        tc = dataclasses.replace(self)
        per_rank, rem = divmod(tc.batch_size, world_size)
        if rem or per_rank == 0 or per_rank % tc.micro_batch_size == 0:
            return tc
        mb = max(d for d in range(1, min(tc.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
        if say is not None:
            say(f"micro-batch {tc.micro_batch_size} -> {mb} sequences so {world_size} processes split the batch "
                f"of {tc.batch_size}")
        tc.micro_batch_size = mb
        return tc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A saved config (to_dict's). A key it lacks takes its former default where that changed
        (_FORMER_DEFAULTS: the run trained under it), else today's."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**_FORMER_DEFAULTS, **{k: v for k, v in d.items() if k in names}})
