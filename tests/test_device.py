import pytest
import torch

import leanmoe.device as device_mod
from leanmoe.device import DTYPES, auto_dtype, dtype_name, resolve_device, torch_dtype


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as the tests assume it: no CUDA and no MPS, whatever the host has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)


# ---------------------------------------------------------------------------- devices
def test_auto_is_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real machine has no GPU")
def test_auto_is_cpu_on_this_machine():
    assert resolve_device("auto").type in ("cpu", "mps")


@pytest.mark.parametrize("name", ["cpu", "cpu:0"])
def test_cpu_works(no_gpu, name):
    assert resolve_device(name) == torch.device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_absent_cuda_raises(no_gpu, name):
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(name)


def test_absent_mps_raises(no_gpu):
    with pytest.raises(ValueError, match="MPS is not available"):
        resolve_device("mps")


def test_present_cuda_is_returned_as_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "cpu:-1:2"])
def test_garbage_raises_value_error(no_gpu, name):
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device(name)


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("name,short", [("fp32", "fp32"), ("float32", "fp32"), ("bf16", "bf16"),
                                        ("bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"),
                                        ("BFloat16", "bf16"), ("FP32", "fp32"), ("auto", "auto")])
def test_dtype_name_aliases(name, short):
    assert dtype_name(name) == short


@pytest.mark.parametrize("name", ["fp64", "float64", "int8", "", "Auto", "half"])
def test_dtype_name_rejects_unknown(name):
    with pytest.raises(ValueError, match="choose one of auto, fp32, bf16, fp16"):
        dtype_name(name)


def test_dtype_name_allowed_restricts_by_canonical_name():
    allowed = ("fp32", "bf16")
    assert dtype_name("bfloat16", allowed=allowed) == "bf16"
    assert dtype_name("auto", allowed=allowed) == "auto"  # always allowed
    for name in ("fp16", "float16"):
        with pytest.raises(ValueError, match="choose one of auto, fp32, bf16$"):
            dtype_name(name, allowed=allowed)


@pytest.mark.parametrize("name,dtype", [("fp32", torch.float32), ("float32", torch.float32),
                                        ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("fp16", torch.float16), ("float16", torch.float16)])
def test_torch_dtype(name, dtype):
    assert torch_dtype(name) is dtype


def test_torch_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="choose one of"):
        torch_dtype("int8")
    assert set(DTYPES) == {"fp32", "bf16", "fp16"}


def test_torch_dtype_of_auto_fails_with_a_value_error():
    # "auto" needs a device to mean anything (auto_dtype); the caller gets a ValueError saying so
    with pytest.raises(ValueError, match="auto"):
        torch_dtype("auto")


def test_engine_cache_dtype_auto_follows_the_weights():
    from leanmoe.config import ModelConfig
    from leanmoe.infer.config import EngineConfig

    c = EngineConfig(device="cpu", dtype="bfloat16", cache_dtype="auto").resolved(ModelConfig.from_preset("tiny"), True)
    assert (c.dtype, c.cache_dtype, c.torch_cache_dtype) == ("bf16", "bf16", torch.bfloat16)


@pytest.mark.parametrize("device,expected", [("cuda", "bf16"), ("cuda:3", "bf16"), (torch.device("cuda", 0), "bf16"),
                                             ("cpu", "fp32"), (torch.device("cpu"), "fp32"), ("mps", "fp32"),
                                             ("meta", "fp32")])
def test_auto_dtype(device, expected):
    assert auto_dtype(device) == expected


@pytest.mark.parametrize("caps, native", [({"avx512_bf16": True, "amx_bf16": False}, True),
                                          ({"avx512_bf16": False, "amx_bf16": True}, True),
                                          ({"avx512_bf16": False, "amx_bf16": False}, False),
                                          ({}, False)])
def test_native_bf16_is_read_from_the_cpu_capabilities(monkeypatch, caps, native):
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: caps)
    assert device_mod.cpu_has_native_bf16() is native
    assert device_mod.auto_train_dtype("cpu") == ("bf16" if native else "fp32")
    assert device_mod.auto_train_dtype("cuda") == "bf16"
    assert auto_dtype("cpu") == "fp32"  # inference keeps fp32 on CPUs (its C kernels are fp32)


def test_native_bf16_is_false_without_the_capability_api(monkeypatch):
    monkeypatch.delattr(torch._C._cpu, "_get_cpu_capability")
    assert device_mod.cpu_has_native_bf16() is False
