import dataclasses

import pytest
import torch

from leanmoe import ModelConfig
from leanmoe.device import auto_train_dtype
from leanmoe.train.config import TrainConfig, TrainingError, parse_duration
from leanmoe.train.memory import HEADROOM, estimate_step_memory

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # resolved() only looks at the type: no GPU needed to test its defaults
FILLED = ("seq_len", "batch_size", "micro_batch_size", "lr", "time_budget", "warmup_steps", "eval_interval",
          "save_interval")


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return ModelConfig.from_preset("tiny")  # hidden 256, max_position_embeddings 1024


# ---------------------------------------------------------------------------- defaults
def test_resolved_fills_every_default_and_leaves_the_caller_unchanged(tiny):
    tc = TrainConfig()
    before = dataclasses.asdict(tc)
    r = tc.resolved(tiny, CPU)
    assert r is not tc and dataclasses.asdict(tc) == before
    assert all(getattr(r, name) is not None for name in FILLED)
    assert (r.seq_len, r.batch_size, r.micro_batch_size) == (256, 16, 16)
    assert r.lr == 3e-3  # the tiny width's tuned value
    assert r.time_budget == 600.0 and r.max_steps is None and r.max_tokens is None
    assert (r.warmup_steps, r.eval_interval, r.save_interval) == (100, 100, 200)  # TIME_BUDGET_WARMUP_STEPS
    assert (r.dtype, r.compile) == (auto_train_dtype(CPU), "off")  # bf16 on a CPU with native bf16
    # resolving again changes nothing
    assert dataclasses.asdict(r.resolved(tiny, CPU)) == dataclasses.asdict(r)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_dtype_auto_is_bf16_only_with_native_bf16_in_one_process(tiny, monkeypatch, native):
    import leanmoe.device as device_mod

    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    assert TrainConfig().resolved(tiny, CPU).dtype == ("bf16" if native else "fp32")
    assert TrainConfig().resolved(tiny, CPU, world_size=2).dtype == "fp32"  # multi-process CPU: not measured
    assert TrainConfig(dtype="fp32").resolved(tiny, CPU).dtype == "fp32"  # an explicit choice wins
    assert TrainConfig().resolved(tiny, CUDA).dtype == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_explicit_bf16_on_a_cpu_that_emulates_it_is_warned_about(tiny, monkeypatch, native):
    import leanmoe.device as device_mod

    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    heard = []
    assert TrainConfig(dtype="bf16").resolved(tiny, CPU, warn=heard.append).dtype == "bf16"  # still the user's choice
    assert len(heard) == (0 if native else 1)
    if heard:
        assert "emulates bf16" in heard[0] and "--dtype auto picks fp32" in heard[0]
    for quiet in (TrainConfig(), TrainConfig(dtype="fp32")):  # auto never picks emulated bf16; fp32 is fine
        quiet.resolved(tiny, CPU, warn=heard.append)
    TrainConfig(dtype="bf16").resolved(tiny, CUDA, warn=heard.append)
    assert len(heard) == (0 if native else 1)


def test_gpu_defaults_are_larger_and_capped_by_the_model(tiny):
    r = TrainConfig().resolved(tiny, CUDA)
    assert r.seq_len == 1024  # 2048 capped at max_position_embeddings
    assert (r.batch_size, r.micro_batch_size) == (32, 32)
    assert (r.dtype, r.compile) == ("bf16", "on")
    short = TrainConfig().resolved(tiny.replace(max_position_embeddings=100), CPU)
    assert short.seq_len == 100


def test_world_size_scales_the_global_batch_not_the_micro_batch(tiny):
    r = TrainConfig().resolved(tiny, CPU, world_size=4)
    assert (r.batch_size, r.micro_batch_size) == (64, 16)
    r = TrainConfig(batch_size=24).resolved(tiny, CPU, world_size=3)
    assert r.micro_batch_size == 8


def test_default_lr_falls_with_width(tiny):
    wide = TrainConfig().resolved(tiny.replace(hidden_size=1024), CPU).lr
    narrow = TrainConfig().resolved(tiny.replace(hidden_size=64), CPU).lr
    assert wide == pytest.approx(float(f"{3e-3 * 0.25 ** 0.78:.2g}"), rel=1e-12)
    assert narrow == pytest.approx(float(f"{3e-3 * 4 ** 0.78:.2g}"), rel=1e-12)
    assert narrow > 3e-3 > wide
    assert TrainConfig(lr=1e-4).resolved(tiny, CPU).lr == 1e-4


@pytest.mark.parametrize("max_steps,warmup,eval_interval", [(10, 1, 2), (3, 1, 1), (1000, 50, 100),
                                                            (100_000, 100, 100)])
def test_warmup_and_intervals_follow_max_steps(tiny, max_steps, warmup, eval_interval):
    r = TrainConfig(max_steps=max_steps).resolved(tiny, CPU)
    assert (r.warmup_steps, r.eval_interval, r.save_interval) == (warmup, eval_interval, 2 * eval_interval)
    assert r.time_budget is None  # a budget was given: no implicit 10 minutes


def test_any_budget_suppresses_the_default_time_budget(tiny):
    r = TrainConfig(max_tokens=1e6).resolved(tiny, CPU)
    assert r.time_budget is None and r.warmup_steps == 100
    r = TrainConfig(time_budget=30.0, save_interval=7).resolved(tiny, CPU)
    assert r.time_budget == 30.0 and r.save_interval == 7


@pytest.mark.parametrize("given,expected", [("bfloat16", "bf16"), ("float32", "fp32"), ("BF16", "bf16"),
                                            ("fp32", "fp32"), ("auto", None)])
def test_dtype_aliases(tiny, given, expected):
    assert TrainConfig(dtype=given).resolved(tiny, CPU).dtype == (expected or auto_train_dtype(CPU))


@pytest.mark.parametrize("compile_", ["on", "off"])
def test_explicit_compile_is_kept(tiny, compile_):
    assert TrainConfig(compile=compile_).resolved(tiny, CUDA).compile == compile_


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,world,match", [
    ({"seq_len": 2048}, 1, "exceeds the model's max_position_embeddings"),
    ({"seq_len": 1}, 1, "at least 2"),
    ({"seq_len": 0}, 1, "at least 2"),
    ({"batch_size": 10, "micro_batch_size": 4}, 1, "multiple of --micro-batch-size 4"),
    ({"batch_size": 8, "micro_batch_size": 4}, 4, "x 4 processes"),
    ({"batch_size": 8, "micro_batch_size": 0}, 1, "positive multiple"),
    ({"batch_size": 0, "micro_batch_size": 1}, 1, "positive multiple"),
    ({"dtype": "fp16"}, 1, "--dtype must be fp32 or bf16"),
    ({"dtype": "float64"}, 1, "--dtype must be fp32 or bf16"),
])
def test_bad_values_raise_training_error(tiny, kwargs, world, match):
    with pytest.raises(TrainingError, match=match):
        TrainConfig(**kwargs).resolved(tiny, CPU, world_size=world)


def test_error_names_the_largest_usable_seq_len(tiny):
    with pytest.raises(TrainingError, match="use --seq-len 1024 or less"):
        TrainConfig(seq_len=1025).resolved(tiny, CPU)
    assert TrainConfig(seq_len=1024).resolved(tiny, CPU).seq_len == 1024
    assert TrainConfig(seq_len=2).resolved(tiny, CPU).seq_len == 2


# ---------------------------------------------------------------------------- memory fit
def test_default_micro_batch_shrinks_to_fit_free_memory(tiny):
    need = {mb: estimate_step_memory(tiny, mb, 256) for mb in (4, 8, 16)}
    free = int(need[4] / HEADROOM) + 1  # 4 fits, 8 does not
    assert need[8] > HEADROOM * free
    said = []
    r = TrainConfig().resolved(tiny, CPU, free_memory=free, say=said.append)
    assert (r.batch_size, r.micro_batch_size) == (16, 4)  # gradient accumulation keeps the batch
    assert len(said) == 1 and "micro-batch 16 -> 4" in said[0] and "--micro-batch-size" in said[0]
    # without `say` it shrinks silently
    assert TrainConfig().resolved(tiny, CPU, free_memory=free).micro_batch_size == 4


def test_enough_memory_keeps_the_default_and_says_nothing(tiny):
    said = []
    r = TrainConfig().resolved(tiny, CPU, free_memory=2**40, say=said.append)
    assert r.micro_batch_size == 16 and said == []


def test_explicit_micro_batch_that_does_not_fit_is_refused(tiny):
    free = int(estimate_step_memory(tiny, 4, 256) / HEADROOM) + 1
    said = []
    with pytest.raises(TrainingError, match="lower --micro-batch-size"):
        TrainConfig(micro_batch_size=16).resolved(tiny, CPU, free_memory=free, say=said.append)
    assert said == []
    # an explicit one that fits is kept
    assert TrainConfig(micro_batch_size=4).resolved(tiny, CPU, free_memory=free).micro_batch_size == 4


def test_nothing_fits_raises_even_for_the_default(tiny):
    with pytest.raises(TrainingError, match="lower --micro-batch-size"):
        TrainConfig().resolved(tiny, CPU, free_memory=1000)


# ---------------------------------------------------------------------------- for_world
def _saved(batch, micro):
    return TrainConfig(batch_size=batch, micro_batch_size=micro)


def test_for_world_shrinks_the_micro_batch_when_the_batch_no_longer_splits():
    said = []
    tc = _saved(16, 16)
    r = tc.for_world(2, say=said.append)
    assert r.micro_batch_size == 8 and r.batch_size == 16 and tc.micro_batch_size == 16
    assert len(said) == 1 and "micro-batch 16 -> 8" in said[0] and "2 processes" in said[0]
    # per-rank 3 of a micro-batch 6: the largest divisor of 3 not above 6
    assert _saved(12, 6).for_world(4).micro_batch_size == 3
    # per-rank 6 of a micro-batch 4: 3 (largest divisor of 6 not above 4)
    assert _saved(12, 4).for_world(2).micro_batch_size == 3


@pytest.mark.parametrize("batch,micro,world", [(16, 4, 1), (16, 4, 2), (16, 4, 4), (12, 4, 5), (4, 4, 8)])
def test_for_world_keeps_a_micro_batch_that_still_splits_or_cannot_be_helped(batch, micro, world):
    said = []
    tc = _saved(batch, micro)
    r = tc.for_world(world, say=said.append)
    assert r is not tc and r.micro_batch_size == micro and said == []


# ---------------------------------------------------------------------------- parse_duration and round trip
@pytest.mark.parametrize("text,seconds", [("10m", 600.0), ("90s", 90.0), ("1.5h", 5400.0), ("1h30m", 5400.0),
                                          ("45", 45.0), (" 2M ", 120.0), ("1h 2m 3s", 3723.0), (".5m", 30.0),
                                          (30, 30.0), (1.5, 1.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "m", "10m junk", "-5m", "1h-30m"])
def test_parse_duration_rejects_garbage(text):
    with pytest.raises(ValueError, match="as a duration"):
        parse_duration(text)


def test_dict_round_trip_ignores_unknown_keys(tiny):
    r = TrainConfig(data=["a.txt"], extra={"k": 1}).resolved(tiny, CPU)
    d = r.to_dict() | {"removed_in_a_later_version": 3}
    assert TrainConfig.from_dict(d) == r
