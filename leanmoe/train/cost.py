"""What a training run costs: FLOPs, GPU-hours, dollars, MFU.

All figures derive from `ModelConfig.flops_per_token` (6 x activated matmul parameters plus
causal attention, plus the MTP modules), a token count, and either an assumed model-FLOPs
utilisation (MFU), a measured throughput, or a known number of GPU-hours:

    total FLOPs = flops_per_token(seq_len) * tokens
    GPU-hours   = total FLOPs / (peak FLOP/s * MFU) / 3600
    cost        = GPU-hours * price per GPU-hour

Peaks are dense (no 2:4 sparsity) vendor figures; MFU is measured against the BF16 peak unless
`precision="fp8"` is asked for (FP8 doubles the peak on Hopper, so the same run has half the
"FP8 MFU"). Prices are assumptions for on-demand rental (DeepSeek's own report assumes $2 per
H800-hour); pass your own with `price_per_hour`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from leanmoe.config import ModelConfig

__all__ = ["GPU", "GPUS", "CostEstimate", "estimate_cost", "parse_count", "find_gpu"]


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense peak
    fp8_tflops: float | None
    price_per_hour: float  # assumed on-demand $/GPU-hour
    memory_gb: float

    def peak_flops(self, precision: str = "bf16") -> float:
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores; use precision='bf16'")
            return self.fp8_tflops * 1e12
        if precision != "bf16":
            raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
        return self.bf16_tflops * 1e12


# Dense peaks from the vendors' data sheets (SXM parts where there are several).
GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("h800", 989.4, 1978.9, 2.00, 80),   # DeepSeek-V3's cluster; $2/h is the report's assumption
    GPU("h100", 989.4, 1978.9, 2.50, 80),
    GPU("h200", 989.4, 1978.9, 3.50, 141),
    GPU("b200", 2250.0, 4500.0, 5.00, 180),
    GPU("gb200", 2500.0, 5000.0, 6.00, 186),
    GPU("a100", 312.0, None, 1.50, 80),
    GPU("l40s", 362.1, 733.0, 1.00, 48),
    GPU("l4", 121.0, 242.5, 0.70, 24),
    GPU("a10", 125.0, None, 0.75, 24),
    GPU("rtx4090", 165.2, 330.3, 0.40, 24),
    GPU("rtx5090", 209.5, 419.0, 0.70, 32),
    GPU("mi300x", 1307.4, 2614.9, 2.50, 192),
    GPU("mi325x", 1307.4, 2614.9, 3.00, 256),
]}


def find_gpu(name: str) -> GPU | None:
    """Match a GPU by table name or by a device name such as 'NVIDIA H100 80GB HBM3'."""
    key = name.lower().replace(" ", "").replace("-", "")
    if key in GPUS:
        return GPUS[key]
    # longest names first, so 'gb200' is not taken for 'b200' and 'h100' not for 'h10'
    for gname in sorted(GPUS, key=len, reverse=True):
        if gname in key or gname.replace("rtx", "") in key.replace("geforce", ""):
            return GPUS[gname]
    return None


_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str | int | float) -> float:
    """'14.8T' -> 1.48e13; '500M', '2.5B', '1e9', '123' also accepted."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([KMBGT]?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a count; write e.g. 14.8T, 500M, 2.5B or 1000000")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


@dataclass
class CostEstimate:
    flops_per_token: float
    tokens: float
    total_flops: float
    gpu: str
    precision: str
    peak_flops: float
    mfu: float
    tokens_per_second: float  # per GPU
    gpu_hours: float
    price_per_hour: float
    cost_usd: float
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"FLOPs per token   {self.flops_per_token:.4g}  (training, seq_len {self.seq_len})",
            f"tokens            {self.tokens:.4g}",
            f"total FLOPs       {self.total_flops:.4g}",
            f"GPU               {self.gpu} ({self.peak_flops / 1e12:.1f} TFLOP/s {self.precision} peak, "
            f"${self.price_per_hour:.2f}/GPU-hour)",
            f"MFU               {self.mfu:.1%}",
            f"tokens/s per GPU  {self.tokens_per_second:,.0f}",
            f"GPU-hours         {self.gpu_hours:,.0f}",
            f"cost              ${self.cost_usd:,.0f}",
        ]


def estimate_cost(cfg: ModelConfig, tokens: float | str, gpu: str, *, mfu: float | None = None,
                  tokens_per_second: float | None = None, gpu_hours: float | None = None,
                  price_per_hour: float | None = None, seq_len: int = 4096, precision: str = "bf16",
                  include_mtp: bool = True) -> CostEstimate:
    """Cost of training `cfg` on `tokens` tokens with GPUs of type `gpu`, given exactly one of:
    an MFU in (0, 1], a measured per-GPU throughput in tokens/s, or the GPU-hours spent
    (which yields the implied MFU)."""
    given = [x is not None for x in (mfu, tokens_per_second, gpu_hours)]
    if sum(given) != 1:
        raise ValueError("give exactly one of mfu, tokens_per_second or gpu_hours")
    g = find_gpu(gpu)
    if g is None:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    n_tokens = parse_count(tokens)
    if n_tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens!r}")
    fpt = cfg.flops_per_token(seq_len, include_mtp=include_mtp)
    total = fpt * n_tokens
    peak = g.peak_flops(precision)
    for name, value in (("mfu", mfu), ("tokens_per_second", tokens_per_second), ("gpu_hours", gpu_hours),
                        ("price_per_hour", price_per_hour)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if price_per_hour is not None and price_per_hour < 0:
        raise ValueError(f"price_per_hour must be >= 0, got {price_per_hour}")
    if mfu is not None:
        if not 0 < mfu <= 1:
            raise ValueError(f"mfu is a fraction in (0, 1], got {mfu}")
        tps = mfu * peak / fpt
    elif tokens_per_second is not None:
        if tokens_per_second <= 0:
            raise ValueError(f"tokens_per_second must be positive, got {tokens_per_second}")
        tps = tokens_per_second
        mfu = tps * fpt / peak
    else:
        if gpu_hours <= 0:
            raise ValueError(f"gpu_hours must be positive, got {gpu_hours}")
        tps = n_tokens / (gpu_hours * 3600)
        mfu = tps * fpt / peak
    hours = n_tokens / tps / 3600
    price = g.price_per_hour if price_per_hour is None else price_per_hour
    return CostEstimate(flops_per_token=fpt, tokens=n_tokens, total_flops=total, gpu=g.name, precision=precision,
                        peak_flops=peak, mfu=mfu, tokens_per_second=tps, gpu_hours=hours, price_per_hour=price,
                        cost_usd=hours * price, seq_len=seq_len)
