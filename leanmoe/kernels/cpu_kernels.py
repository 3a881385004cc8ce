"""leanmoe's C kernels for CPUs: compiled on first use with the system C compiler, loaded with ctypes.

The sources (`cpu_mla.c`, `cpu_moe.c`, `cpu_rows.c`, `cpu_experts.c` next to this file) are C11 with
OpenMP (`cpu_experts.c` also with AVX512-BF16 intrinsics, compiled only where -march=native has them);
they are built with `-O3 -march=native -fopenmp` into ~/.cache/leanmoe/kernels (or
$LEANMOE_CACHE/kernels), under a name that hashes the sources, the flags, the compiler and this
CPU's feature flags, so a rebuilt source, a new compiler or another CPU sharing the home folder gets
its own library. A build takes about a second. ctypes releases the interpreter lock for the call,
and the library shares torch's OpenMP runtime (the same libgomp.so.1 soname), so its threads are
torch's threads.

Why not torch.utils.cpp_extension: its headers take a minute to compile on a laptop, on every new
machine and every torch upgrade; these kernels need only pointers.

Without a compiler (or with LEANMOE_CPU_KERNELS=0) `library()` returns None and `status()` says why;
callers then use their torch path, and `leanmoe serve` prints which one it runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["library", "status", "FLAGS"]

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_mla.c", "cpu_moe.c", "cpu_rows.c", "cpu_experts.c")]
HEADERS = [Path(__file__).with_name("cpu_bf16.h")]  # included by the sources: part of the build's name
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC"]
_status = "not loaded yet"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("LEANMOE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "leanmoe") / "kernels"


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([*(src.read_text() for src in SOURCES + HEADERS), " ".join(FLAGS), version, _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"leanmoe_cpu_{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: atomic
        built = Path(tmp) / target.name
        proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
        os.replace(built, target)
    return target


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (see `status()` for why)."""
    global _status
    if os.environ.get("LEANMOE_CPU_KERNELS", "1") == "0":
        _status = "off (LEANMOE_CPU_KERNELS=0)"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _status = "unavailable: no C compiler found (install gcc, or set CC)"
        return None
    try:
        import torch  # noqa: F401  # loads torch's libgomp first, so the library binds to it

        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        _status = f"unavailable: building {', '.join(src.name for src in SOURCES)} failed: {e}"
        return None
    fn = lib.leanmoe_mla_decode_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 8 + [ctypes.c_float] + [ctypes.c_int] * 3
    fn = lib.leanmoe_expert_mlp_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 5
    P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for name, args in (("leanmoe_gather_rows_bf16", [P, I, P, I64, I64, I, P, I]),
                       ("leanmoe_sum_rows_bf16", [P, P, P, I64, I, I, I64, P, I, I]),
                       ("leanmoe_combine_backward_bf16", [P, P, P, P, I64, I, I, I64, P, P, I]),
                       ("leanmoe_experts_bf16_available", []),
                       ("leanmoe_experts_bf16_forward", [P, P, I, I64, I, I, P, P, P, P, I]),
                       ("leanmoe_experts_bf16_backward", [P, P, I, I64, I, I, P, P, P, P, P, P, P, I])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, args
    _status = f"on ({cc}, {' '.join(FLAGS[:3])})"
    return lib


def status() -> str:
    """Whether the C kernels are in use, and if not why: for logs."""
    library()
    return _status
