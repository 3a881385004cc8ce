"""Device and dtype names, the same for training and inference.

    device: auto | cpu | cuda | cuda:N | mps      auto: cuda when available, else mps, else cpu
    dtype:  auto | fp32 | bf16 | fp16             (float32 | bfloat16 | float16 are accepted too)

"auto" dtype is bf16 on a GPU and fp32 elsewhere (`auto_dtype`); training also takes bf16 on a
CPU that computes it natively (`auto_train_dtype`). What a dtype applies to is the caller's
business: the trainer autocasts its forward pass to it, the inference engine stores weights and
cache in it.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "resolve_device", "dtype_name", "torch_dtype", "auto_dtype", "auto_train_dtype",
           "cpu_has_native_bf16"]

# every accepted spelling -> the canonical short name
_ALIASES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """A concrete torch.device; ValueError naming the problem for an unknown or absent device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r}: not a device name; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "mps" and not _mps_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return dev


def dtype_name(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> str:
    """The canonical short name (fp32 | bf16 | fp16) of `name`, which may also be auto; ValueError
    for anything else or for a dtype outside `allowed`."""
    if name == "auto":
        return name
    short = _ALIASES.get(str(name).lower())
    if short is None or short not in allowed:
        raise ValueError(f"dtype {name!r}: choose one of auto, {', '.join(allowed)}")
    return short


def auto_dtype(device: torch.device | str) -> str:
    """bf16 on a GPU, fp32 elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16), which
    torch's CPU GEMMs (oneDNN) use. Without them bf16 is emulated and no faster than fp32."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):  # a private API: an older or newer torch may lack it
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def auto_train_dtype(device: torch.device | str) -> str:
    """The trainer's autocast dtype for --dtype auto: bf16 on a GPU and on a CPU with native bf16
    (cpu_has_native_bf16), fp32 elsewhere.

    NOTE: on the 2-core AVX512-BF16 CPU, bf16 autocast trained `tiny` 1.23x faster and its dense
    twin 1.43x faster than fp32, and its validation loss stayed within 0.7% of fp32's after the
    first evaluation over 150 steps (bench/bf16_cpu.py, docs/benchmarks.md)."""
    dev = torch.device(device)
    if dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a concrete name; ValueError for "auto" (resolve it with auto_dtype first)."""
    short = dtype_name(name)
    if short == "auto":
        raise ValueError("dtype 'auto' has no torch dtype until a device is chosen (leanmoe.device.auto_dtype)")
    return DTYPES[short]
