"""The CPU heap setting the trainer applies (leanmoe.train.memory.retain_cpu_heap)."""

import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

from leanmoe.train import TrainConfig, Trainer, TrainingError
from leanmoe.train.memory import retain_cpu_heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a training step's pattern: the same 64 MB activation freed and allocated again, step after step
FAULTS_SCRIPT = """
import json, resource, torch
from leanmoe.train.memory import retain_cpu_heap
heap = retain_cpu_heap()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(10):
    f0 = faults()
    x = torch.empty(16 << 20).fill_(1.0)
    y = x * 2
    del x, y
    counts.append(faults() - f0)
print(json.dumps({"heap": heap, "faults": counts}))
"""


def _faults_per_step(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    env["LEANMOE_CPU_HEAP"] = setting
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's (mallopt)")
def test_retained_heap_stops_the_page_faults_of_reallocated_activations():
    system, retain = _faults_per_step("system"), _faults_per_step("retain")
    assert system["heap"].startswith("system allocator") and retain["heap"] == "freed memory kept for reuse"
    pages = 2 * (64 << 20) // 4096  # two 64 MB tensors a step
    # glibc's default hands each step's blocks back: every step faults them in again
    assert min(system["faults"][1:]) > pages // 2, system
    # kept: once the heap has grown to its working size, the same pages are reused. Most steps fault
    # nothing; the heap still grows now and then on this machine (one 64 MB block at a random later
    # step in ~1 run of 3), so the claim is the typical step and the total, not the worst step
    later = retain["faults"][1:]
    assert sorted(later)[len(later) // 2] < pages // 20, retain
    assert sum(later) < sum(system["faults"][1:]) / 2, (retain, system)


def test_system_setting_and_a_users_allocator_are_left_alone(monkeypatch):
    def no_mallopt(*args, **kwargs):
        raise AssertionError("mallopt must not be called")

    monkeypatch.setattr(ctypes, "CDLL", no_mallopt)
    for k in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LEANMOE_CPU_HEAP", "system")
    assert retain_cpu_heap() == "system allocator (LEANMOE_CPU_HEAP=system)"
    monkeypatch.delenv("LEANMOE_CPU_HEAP")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert retain_cpu_heap() == "allocator left as set (MALLOC_TRIM_THRESHOLD_)"
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1000000")
    assert retain_cpu_heap() == "allocator left as set (GLIBC_TUNABLES, LD_PRELOAD)"


def test_bad_setting_is_a_clear_error_before_the_run_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANMOE_CPU_HEAP", "jemalloc")
    with pytest.raises(ValueError, match="LEANMOE_CPU_HEAP='jemalloc'.*'retain'.*'system'"):
        retain_cpu_heap()
    trainer = Trainer(TrainConfig(data=str(tmp_path / "none"), out=str(tmp_path / "run"), device="cpu", progress=False))
    with pytest.raises(TrainingError, match="LEANMOE_CPU_HEAP"):
        trainer.setup()
    assert not (tmp_path / "run").exists()
