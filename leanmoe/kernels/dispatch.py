"""Kernel dispatch: the one rule every leanmoe kernel follows, and the one place triton is imported.

Tensors on a CUDA/ROCm device with Triton importable run the Triton kernel; anything else runs
the torch reference. `LEANMOE_TRITON_INTERPRET=1` forces the Triton kernels for CPU tensors
through Triton's interpreter. A Triton path that cannot run or fails raises: nothing falls back
silently.

The interpreter is chosen once per process, when triton is first imported (`TRITON_INTERPRET=1`):
when this module is the first to import triton and the machine has no GPU (so there is nothing to
compile for) or LEANMOE_TRITON_INTERPRET=1 is set, it sets TRITON_INTERPRET=1 first (unless the
environment says otherwise).

Kernel modules take from here `triton_jit` (their decorator), `tl`, `cdiv` and `next_power_of_2`
for tile sizes, and call `use_triton(t)` at their dispatch point. Without triton installed, `triton`
and `tl` are None and `triton_jit` leaves the function bare (never launched).

On CPUs, ops that have a C kernel (leanmoe.kernels.cpu_kernels: MLA decode, the experts' MLP) run it for fp32
tensors when it is built, at the shapes where it measured faster; `use_cpu_kernel(*ts)` says
whether it can run. Without a C compiler, or with LEANMOE_CPU_KERNELS=0, the torch path runs, and
`cpu_kernels.status()` (printed by `leanmoe serve`) says why.
"""

from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and (os.environ.get("LEANMOE_TRITON_INTERPRET") == "1"
                                    or not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # CPU-only installs: every op has its torch reference
    triton = tl = InterpretedFunction = None

__all__ = ["use_triton", "use_cpu_kernel", "interpret_requested", "triton_jit", "cdiv", "next_power_of_2",
           "check_tile_config", "triton", "tl"]


def interpret_requested() -> bool:
    """Whether LEANMOE_TRITON_INTERPRET=1 asks for the Triton kernels on CPU (read at every call)."""
    return os.environ.get("LEANMOE_TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether ops on `t` take the Triton path (see the module docstring). Raises when the
    interpreter is requested but cannot run, instead of quietly using the reference."""
    if t.device.type == "cuda":  # NVIDIA and ROCm builds alike
        return triton is not None
    if t.device.type == "cpu" and interpret_requested():
        if triton is None:
            raise RuntimeError("LEANMOE_TRITON_INTERPRET=1 but triton is not installed")
        # triton.language's own helpers (tl.max, ...) were built interpreted or compiled at import
        if not (isinstance(tl.max, InterpretedFunction) and triton.knobs.runtime.interpret):
            raise RuntimeError("LEANMOE_TRITON_INTERPRET=1: triton was imported without TRITON_INTERPRET=1, "
                               "so its kernels cannot run on CPU; set TRITON_INTERPRET=1 in the environment "
                               "(or before anything imports triton)")
        return True
    return False


def use_cpu_kernel(*ts: torch.Tensor) -> bool:
    """Whether an op on `ts` (all fp32 CPU tensors, not routed to Triton) runs its C kernel."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in ts) or use_triton(ts[0]):
        return False
    from leanmoe.kernels.cpu_kernels import library

    return library() is not None


def triton_jit(fn):
    """triton.jit when Triton is importable; the bare function otherwise (never launched)."""
    return triton.jit(fn) if triton is not None else fn


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers."""
    return -(-a // b)


def next_power_of_2(x: int) -> int:
    """The smallest power of two >= x for x >= 1 (tile sizes: tl.arange needs powers of two)."""
    return 1 << max(0, (x - 1).bit_length())


def check_tile_config(name: str, tile_config) -> list[int] | None:
    """A launcher's `tile_config` override: None (the launcher's default choice) or four positive
    ints (two tile sizes and num_warps, powers of two, then num_stages). -> a list (what a custom
    op takes), or None."""
    if tile_config is None:
        return None
    t = list(tile_config)
    if len(t) != 4 or not all(isinstance(v, int) and v > 0 for v in t) or any(v & (v - 1) for v in t[:3]):
        raise ValueError(f"{name}: tile_config must be (tile, tile, num_warps, num_stages): positive ints, the "
                         f"first three powers of two; got {tile_config!r}")
    return t
