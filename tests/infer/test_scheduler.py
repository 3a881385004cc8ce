"""leanmoe/infer/scheduler.py: admission within budgets, decode growth, preemption by recompute. No torch."""

import subprocess
import sys
from pathlib import Path

from leanmoe.infer.block_manager import BlockManager
from leanmoe.infer.sampling_params import SamplingParams
from leanmoe.infer.scheduler import Scheduler
from leanmoe.infer.sequence import Sequence, SequenceStatus

P = SamplingParams(temperature=0)


def make(num_blocks=16, block_size=4, max_num_seqs=8, budget=32, decode_tokens=1):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs, budget, decode_tokens)


def step(sched, batch, token=5):
    """What the engine does after a step: one new token per sequence, all but the last cached."""
    for s in batch.seqs:
        s.token_ids.append(token)
        s.num_cached_tokens = len(s) - 1
        sched.block_manager.register(s)


def test_prefill_then_decode_and_requests_join_between_steps():
    bm, sched = make()
    a = Sequence(list(range(6)), P)
    sched.add(a)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [a] and batch.num_tokens == 6
    step(sched, batch)
    batch = sched.schedule()
    assert not batch.is_prefill and batch.seqs == [a]
    step(sched, batch)
    b = Sequence(list(range(50, 53)), P)
    sched.add(b)
    batch = sched.schedule()  # the newcomer is prefilled first ...
    assert batch.is_prefill and batch.seqs == [b]
    step(sched, batch)
    batch = sched.schedule()  # ... then both decode together
    assert not batch.is_prefill and batch.seqs == [a, b]


def test_token_budget_and_max_num_seqs():
    bm, sched = make(budget=10, max_num_seqs=2)
    seqs = [Sequence(list(range(100 * i, 100 * i + 6)), P) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == [seqs[0]]  # 6 + 6 > 10
    step(sched, batch)
    batch = sched.schedule()
    assert batch.seqs == [seqs[1]]
    step(sched, batch)
    batch = sched.schedule()  # max_num_seqs reached: decode, the third waits
    assert not batch.is_prefill and len(batch.seqs) == 2 and seqs[2].status is SequenceStatus.WAITING


def test_decode_preempts_the_newest_when_blocks_run_out():
    bm, sched = make(num_blocks=4, block_size=4)
    a = Sequence(list(range(7)), P)  # 2 blocks
    b = Sequence(list(range(100, 107)), P)  # 2 blocks
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and bm.num_free_blocks == 0
    step(sched, batch)  # both at 8 tokens, 7 cached: next decode writes position 7 (fits)
    batch = sched.schedule()
    assert batch.seqs == [a, b]
    step(sched, batch)  # now position 8 needs a third block each: b is preempted for a
    batch = sched.schedule()
    assert batch.seqs == [a] and sched.waiting[0] is b
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_cached_tokens == 0
    assert sched.num_preemptions == 1 and len(b) == 9  # keeps its tokens: recomputed later
    sched.finish([a])
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [b] and batch.num_tokens <= 9


def test_speculative_decode_reserves_two_slots():
    bm, sched = make(num_blocks=8, block_size=4, decode_tokens=2)
    a = Sequence(list(range(3)), P)
    sched.add(a)
    step(sched, sched.schedule())  # 4 tokens, 3 cached
    batch = sched.schedule()
    assert len(a.block_table) == 2  # positions 3 and 4 -> a second block
    assert batch.num_tokens == 2


def test_abort_and_finish_free_blocks():
    bm, sched = make()
    a, b, c = (Sequence(list(range(10 * i, 10 * i + 5)), P) for i in range(3))
    for s in (a, b):
        sched.add(s)
    sched.schedule()
    sched.add(c)
    assert sched.abort(c.request_id) is c and c.finish_reason == "abort"
    assert sched.abort(a.request_id) is a and a.block_table == []
    assert sched.abort("nope") is None
    sched.finish([b])
    assert not sched.has_unfinished() and bm.num_free_blocks == 16


# The package __init__ files import the engine (and with it torch), so the child process stands
# in empty packages for `leanmoe` and `leanmoe.infer`: what is checked is that these modules and
# everything they import run with torch unimportable.
TORCH_FREE = """
import sys, types
sys.modules["torch"] = None  # `import torch` now raises ImportError
for name in ("leanmoe", "leanmoe.infer"):
    package = types.ModuleType(name)
    package.__path__ = [sys.argv[1] + "/" + name.replace(".", "/")]
    sys.modules[name] = package

from leanmoe.infer.block_manager import BlockManager
from leanmoe.infer.sampling_params import SamplingParams
from leanmoe.infer.scheduler import Scheduler
from leanmoe.infer.sequence import Sequence

sched = Scheduler(BlockManager(num_blocks=4, block_size=4), max_num_seqs=2, max_num_batched_tokens=16)
seq = Sequence([1, 2, 3, 4, 5], SamplingParams(temperature=0))
sched.add(seq)
batch = sched.schedule()
assert batch.is_prefill and batch.seqs == [seq] and seq.block_table == [0, 1], (batch, seq)
seq.token_ids.append(6)
seq.num_cached_tokens = len(seq) - 1
batch = sched.schedule()
assert not batch.is_prefill and batch.num_tokens == 1, batch
sched.finish([seq])
assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 4
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""


def test_scheduler_block_manager_and_sequence_run_without_torch():
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", TORCH_FREE, str(root)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
