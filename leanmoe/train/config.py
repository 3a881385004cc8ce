"""TrainConfig: every knob of a training run, as data (the CLI fills it; Python users build it)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainConfig", "parse_duration"]


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
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd only
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float | None = None  # None: the model config's mtp_loss_weight
    fp8: bool = False  # fine-grained FP8 linear layers and experts (sets the model config's fp8)
    bias_update_speed: float | None = None  # None: the model config's

    # evaluation, checkpoints, logging
    eval_interval: int | None = None
    eval_batches: int = 8
    sample_tokens: int = 48
    save_interval: int | None = None
    keep_last: int = 3
    log_interval: int = 1
    progress: bool = True

    # runtime
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    compile: str = "auto"  # auto (on for CUDA) | on | off
    resume: bool = False

    # cost report
    gpu: str | None = None  # price/peak table entry; default: detected from the device
    price_per_hour: float | None = None

    extra: dict[str, Any] = field(default_factory=dict)

    def budget_given(self) -> bool:
        return any(x is not None for x in (self.max_steps, self.max_tokens, self.time_budget))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
