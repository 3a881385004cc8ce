"""World in a single process: every method is a no-op that returns its input. The distributed side
is exercised under torchrun by tests/parallel/test_trainer.py."""

import copy
import signal

import pytest
import torch
from torch import nn

from leanmoe.parallel.world import World

CPU = torch.device("cpu")


@pytest.fixture
def world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    w = World.join(CPU)
    yield w
    w.close()


@pytest.mark.parametrize("env", [None, "1"])
def test_join_alone_is_rank_0_of_1(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", env)
    w = World.join(CPU)
    assert (w.rank, w.size, w.device) == (0, 1, CPU)
    assert not w.distributed and w.is_rank0
    assert w.dims is None and w.describe() == "1 process"
    assert w.local_device(torch.device("cuda")) == torch.device("cuda")  # unchanged without torchrun
    assert not torch.distributed.is_initialized()
    w.close()


def test_collectives_return_their_input(world):
    t = torch.arange(5.0)
    before = t.clone()
    out = world.all_reduce_sum(t)
    assert out is t
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    assert world.broadcast_float(2.5) == 2.5
    assert world.broadcast_str("runs/2024") == "runs/2024"
    assert world.broadcast_str("") == ""


def test_rank0_first_runs_once_and_rank0_value_returns_fn(world):
    calls = []
    assert world.rank0_first(lambda: calls.append(1), RuntimeError("unused")) is None
    assert calls == [1]
    assert world.rank0_value(lambda: "chosen", RuntimeError("unused")) == "chosen"
    # fn's own error reaches the caller, not the error meant for the other ranks
    with pytest.raises(KeyError):
        world.rank0_first(lambda: {}["missing"], RuntimeError("unused"))
    with pytest.raises(KeyError):
        world.rank0_value(lambda: {}["missing"], RuntimeError("unused"))


@pytest.mark.parametrize("max_norm", [0.1, 1e6])
def test_clip_grad_norm_equals_torch(world, max_norm):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model(torch.randn(5, 4)).pow(2).sum().backward()
    ref = copy.deepcopy(model)  # deepcopy leaves .grad behind: copy it
    for p, q in zip(model.parameters(), ref.parameters()):
        q.grad = p.grad.clone()
    norm = world.clip_grad_norm_(model.parameters(), max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    if max_norm < norm:
        torch.testing.assert_close(total, torch.tensor(max_norm), rtol=1e-4, atol=0)


def test_stop_on_signals_keeps_keyboard_interrupt(world):
    handler = signal.getsignal(signal.SIGINT)
    term = signal.getsignal(signal.SIGTERM)
    with world.stop_on_signals() as signalled:
        assert signalled == []
        assert signal.getsignal(signal.SIGINT) is handler
        assert signal.getsignal(signal.SIGTERM) is term
    assert signal.getsignal(signal.SIGINT) is handler and signalled == []


def test_build_mesh_is_a_no_op_and_close_is_harmless(world):
    world.build_mesh(2, 16)
    assert world.dims is None and world.describe() == "1 process"
    world.close()
    world.close()
    assert not torch.distributed.is_initialized()
