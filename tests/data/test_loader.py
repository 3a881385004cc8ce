"""leanmoe/data/loader.py: training windows as a pure function of (seed, step, rank), validation in fixed order."""

import json

import numpy as np
import pytest
import torch

from leanmoe.data.loader import TokenLoader, eval_batches
from leanmoe.data.sources import DataError


def tokens(n=5000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 60000, size=n).astype(np.uint16)


def test_loader_batches_are_shifted_windows():
    data = np.arange(5000, dtype=np.uint16)  # token value = its position, so windows are easy to check
    x, y = TokenLoader(data, batch_size=4, seq_len=16, seed=0).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)  # targets: the next token
    torch.testing.assert_close(x, x[:, :1] + torch.arange(16), rtol=0, atol=0)  # consecutive tokens
    assert 0 <= int(x[:, 0].min()) and int(y[:, -1].max()) < 5000
    assert len(set(x[:, 0].tolist())) == 4  # random offsets


def test_loader_is_a_function_of_seed_step_and_rank():
    data = tokens()
    a, b = TokenLoader(data, 4, 16, seed=7), TokenLoader(data, 4, 16, seed=7)
    batches = [a.next_batch() for _ in range(5)]
    for want in batches:
        got = b.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(a.batch_at(2)[0], batches[2][0]) and a.step == 5
    assert not torch.equal(TokenLoader(data, 4, 16, seed=8).next_batch()[0], batches[0][0])
    r0 = TokenLoader(data, 4, 16, seed=7, rank=0, world_size=2).next_batch()[0]
    r1 = TokenLoader(data, 4, 16, seed=7, rank=1, world_size=2).next_batch()[0]
    assert torch.equal(r0, batches[0][0]) and not torch.equal(r0, r1)


def test_loader_resumes_exactly_from_its_state():
    data = tokens()
    run = TokenLoader(data, 3, 8, seed=1)
    for _ in range(4):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON round trip
    assert state["step"] == 4
    expected = [run.next_batch() for _ in range(3)]
    resumed = TokenLoader(data, 3, 8, seed=1)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = TokenLoader(data, 3, 8, seed=2)
    with pytest.warns(UserWarning, match="seed 1 -> 2"):
        other.load_state_dict(state)
    assert other.step == 4
    with pytest.raises(ValueError, match="no 'step'"):
        other.load_state_dict({})


def test_loader_errors():
    with pytest.raises(DataError, match=r"the train split has 10 tokens, fewer than seq_len \+ 1 = 11; lower --seq-len"):
        TokenLoader(np.arange(10), 2, 10, seed=0)
    with pytest.raises(DataError, match="the val split has 3 tokens"):
        TokenLoader(np.arange(3), 2, 10, seed=0, split="val")
    with pytest.raises(ValueError, match="rank must be in"):
        TokenLoader(tokens(), 2, 10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="must be positive"):
        TokenLoader(tokens(), 0, 10, seed=0)


# ---------------------------------------------------------------------------- eval_batches
def test_eval_batches_are_fixed_consecutive_windows():
    data = np.arange(1000, dtype=np.uint16)
    batches = list(eval_batches(data, batch_size=4, seq_len=10))
    again = list(eval_batches(data, batch_size=4, seq_len=10))
    assert len(batches) == 25 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (99, 10) and y.dtype == torch.int64  # (1000 - 1) // 10 windows, last batch of 3
    assert x.reshape(-1).tolist() == list(range(990)) and y.reshape(-1).tolist() == list(range(1, 991))
    assert len(list(eval_batches(data, 4, 10, max_batches=3))) == 3


def test_eval_batches_split_evenly_across_ranks():
    data = np.arange(1000, dtype=np.uint16)  # 25 batches of 4 x 10 -> 12 per rank, one dropped
    per_rank = [list(eval_batches(data, 4, 10, rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in per_rank] == [12, 12]
    firsts = sorted(int(b[0][0, 0]) for p in per_rank for b in p)
    assert firsts == [40 * j for j in range(24)]
    with pytest.raises(DataError, match=r"makes 1 batch\(es\) of 4 x 10, fewer than the 2 ranks"):
        list(eval_batches(np.arange(30), 4, 10, world_size=2))
    with pytest.raises(DataError, match="the val split has 5 tokens"):
        list(eval_batches(np.arange(5), 4, 10))
