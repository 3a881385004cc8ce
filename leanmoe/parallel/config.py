"""ParallelConfig: how a distributed run is laid out, as data (a launch setting, not part of the
model). It sits beside leanmoe.config.ModelConfig, leanmoe.train.config.TrainConfig and
leanmoe.infer.config.EngineConfig."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ParallelConfig"]


@dataclass
class ParallelConfig:
    """How a distributed run is laid out.

    ep: expert-parallel degree; None means 1, or when resuming the value saved with the run if it
        divides the number of processes. Must divide the world size and n_routed_experts.
    activation_checkpointing: recompute attention, dense MLPs and expert SwiGLUs in backward
        (the all-to-alls are not repeated).
    fp8_dispatch: send dispatch payloads as FP8 E4M3 with one fp32 scale per 1x128 tile.
    bf16_combine: send combine payloads (and all gradient all-to-alls) in bf16.
    timeout_s: how long a rank waits in a collective for the others before it gives up (a frozen or
        dead peer); gloo's and NCCL's own default is 30 minutes. Rank 0's data preparation (tokenizer
        training, shard building) is waited for without this limit.
    """

    ep: int | None = None
    activation_checkpointing: bool = False
    fp8_dispatch: bool = False
    bf16_combine: bool = False
    timeout_s: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
