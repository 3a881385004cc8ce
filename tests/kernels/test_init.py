"""leanmoe.kernels' package face: its public names, loaded lazily (no triton at import)."""

import subprocess
import sys

import leanmoe.kernels as kernels


def test_every_public_name_resolves_to_its_module():
    assert kernels.__all__ == sorted(kernels.__all__) and len(set(kernels.__all__)) == len(kernels.__all__)
    for name in kernels.__all__:
        value = getattr(kernels, name)
        assert getattr(sys.modules[f"leanmoe.kernels.{kernels._HOME[name]}"], name) is value
    assert set(kernels.__all__) <= set(dir(kernels))


def test_unknown_name_is_an_attribute_error():
    assert not hasattr(kernels, "no_such_kernel")


def test_import_loads_no_triton_until_a_kernel_is_used():
    code = ("import sys, leanmoe.kernels as k; assert 'triton' not in sys.modules, 'import'; "
            "k.__all__; dir(k); assert 'triton' not in sys.modules, 'dir'; "
            "k.grouped_mm; assert 'triton' not in sys.modules, 'grouped_mm'; "
            "k.fp8_gemm_nt; import leanmoe.kernels.deep_gemm, leanmoe.kernels.flash_mla")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
