"""Distributed training through the real Trainer and CLI: loss parity with a single process on the
same global batch, equal router biases on every rank, and checkpoints that resume with another
number of processes and load as one HF-layout model.

The single-process reference runs the same Trainer; only its loader is replaced by one that
concatenates the batches the ranks draw (TokenLoader(rank, world_size)), so both see the same
global batch each step. fp32 on CPU: losses agree to 1e-5 relative (they differ only by
summation order across ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leanmoe
from leanmoe.data.loader import TokenLoader
from leanmoe.parallel.config import ParallelConfig
from leanmoe.train import TrainConfig, Trainer
from tests.parallel.dist_util import spawn
from tests.util import MICRO_TRAIN, write_corpus

MICRO = MICRO_TRAIN
STEPS, BATCH, SEQ = 4, 8, 32
RTOL = 1e-5


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_train")
    old = os.environ.get("LEANMOE_CACHE")
    os.environ["LEANMOE_CACHE"] = str(root / "cache")
    corpus = root / "corpus"
    write_corpus(corpus)
    (root / "micro.json").write_text(json.dumps(MICRO))
    yield root
    if old is None:
        os.environ.pop("LEANMOE_CACHE", None)
    else:
        os.environ["LEANMOE_CACHE"] = old


def _tc(root: Path, out: str, world: int, **kw) -> TrainConfig:
    base = dict(config=str(root / "micro.json"), data=[str(root / "corpus")], out=str(root / out), seq_len=SEQ,
                batch_size=BATCH, micro_batch_size=BATCH // world, lr=3e-3, warmup_steps=2, max_steps=STEPS,
                eval_interval=2, save_interval=2, eval_batches=8 // (BATCH // world), sample_tokens=4, progress=False,
                dtype="fp32")  # what multi-process CPU runs take for auto; one process would take bf16 on some CPUs
    base.update(kw)
    return TrainConfig(**base)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class _GlobalBatch:
    """What `world` ranks draw in one micro-step, as one batch (rank 0's sequences first)."""

    def __init__(self, loaders: list[TokenLoader]):
        self.loaders = loaders

    def next_batch(self, device=None):
        xs, ys = zip(*(loader.next_batch() for loader in self.loaders))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self):
        return self.loaders[0].state_dict()


def _reference(root: Path, out: str, world: int, tokenizer: Path) -> Trainer:
    trainer = Trainer(_tc(root, out, 1, micro_batch_size=BATCH, eval_batches=1, tokenizer=str(tokenizer)))
    trainer.setup()
    trainer.loader = _GlobalBatch([TokenLoader(trainer.shards.train, BATCH // world, SEQ, seed=0, rank=r,
                                               world_size=world) for r in range(world)])
    trainer.train()
    return trainer


def _train_worker(root: str, out: str, world: int, ep: int, tokenizer: str | None, checkpointing: bool) -> None:
    import torch.distributed as dist

    kw = {"tokenizer": tokenizer} if tokenizer else {}
    trainer = Trainer(_tc(Path(root), out, world, **kw), ParallelConfig(ep=ep, activation_checkpointing=checkpointing))
    trainer.train()
    biases = [m.gate.e_score_correction_bias.tolist() for m in trainer.model.moe_layers()]
    gathered = [None] * world
    dist.all_gather_object(gathered, biases)
    if dist.get_rank() == 0:
        Path(root, out, "biases_per_rank.json").write_text(json.dumps(gathered))


def _assert_same_run(dist_run: Path, ref: Trainer, compare_val: bool = True) -> None:
    got, want = _records(dist_run), _records(ref.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=RTOL), (g["step"], key, g[key], w[key])
        assert g["load_max_over_mean"] == pytest.approx(w["load_max_over_mean"], rel=RTOL)
        assert g["tokens"] == w["tokens"]
        if compare_val and "val_loss" in w:
            assert g["val_loss"] == pytest.approx(w["val_loss"], rel=RTOL)
    # the checkpoint the ranks wrote together is one HF folder holding the single-process weights
    # (router biases included); Adam turns 1e-7 gradient differences into ~1e-6 weight ones
    model = leanmoe.from_pretrained(dist_run)
    for name, t in ref.model.state_dict().items():
        if not name.endswith("tokens_per_expert"):
            torch.testing.assert_close(model.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_cli_nproc_matches_single_process_and_resumes_with_another_world_size(workspace):
    """`leanmoe train --nproc 2 --ep 2` (torchrun underneath) trains like one process on the same
    global batch and writes one checkpoint, which a single process then resumes."""
    run = workspace / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "leanmoe", "train", "--config", str(workspace / "micro.json"), "--data",
           str(workspace / "corpus"), "--out", str(run), "--seq-len", str(SEQ), "--batch-size", str(BATCH),
           "--lr", "3e-3", "--warmup-steps", "2", "--max-steps", str(STEPS), "--eval-interval", "100",
           "--save-interval", "2", "--quiet", "--nproc", "2", "--ep", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(f"checkpoints/step-{STEPS}") == 1  # only rank 0 reports
    state = json.loads((run / "checkpoints" / f"step-{STEPS}" / "trainer_state" / "trainer_state.json").read_text())
    assert state["parallel"]["world_size"] == 2 and state["parallel"]["ep"] == 2
    ref = _reference(workspace, "ref_cli", 2, run / "tokenizer.json")
    # the CLI evaluates 8 batches of 4 windows per rank, the reference 1 batch of 8: val differs
    _assert_same_run(run, ref, compare_val=False)

    saved = leanmoe.from_pretrained(run)
    resumed = Trainer(TrainConfig(out=str(run), resume=True, max_steps=STEPS + 1, progress=False))
    resumed.setup()
    assert resumed.world.size == 1 and resumed.start_state["step"] == STEPS
    assert resumed.tc.batch_size == BATCH and resumed.tc.micro_batch_size == BATCH // 2
    for name, t in saved.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], t, rtol=0, atol=0)
    first = resumed.optimizer.param_groups[0]["params"][0]
    assert resumed.optimizer.state[first]["step"].item() == STEPS  # AdamW state came back too
    result = resumed.train()
    assert result.steps == STEPS + 1 and [r["step"] for r in _records(run)] == list(range(1, STEPS + 2))


def test_4ranks_ep2_dp2_with_activation_checkpointing_matches_single_process(workspace):
    """Experts split over 2 ranks and FSDP-sharded over the other 2; the reference never
    checkpoints activations: recomputation must change nothing and count no token twice."""
    world, out = 4, "ep2dp2"
    tokenizer = workspace / "cli" / "tokenizer.json"
    spawn(_train_worker, world, str(workspace), out, world, 2, str(tokenizer) if tokenizer.is_file() else None,
          True, timeout_s=240)
    ref = _reference(workspace, "ref4", world, workspace / out / "tokenizer.json")
    _assert_same_run(workspace / out, ref)
    # every rank holds the same router biases, and they are the single-process ones
    biases = json.loads((workspace / out / "biases_per_rank.json").read_text())
    assert all(b == biases[0] for b in biases)
    want = [m.gate.e_score_correction_bias.tolist() for m in ref.model.moe_layers()]
    torch.testing.assert_close(torch.tensor(biases[0]), torch.tensor(want), rtol=0, atol=1e-7)


def _signal_worker(root: str, out: str, world: int, tokenizer: str | None) -> None:
    import signal

    import torch.distributed as dist

    from leanmoe.train import trainer as trainer_mod

    real = trainer_mod.lr_at

    def lr_at(step, *a, **k):  # as step 3 starts, only rank 1 gets SIGTERM (what torchrun forwards)
        if step == 2 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *a, **k)

    trainer_mod.lr_at = lr_at
    kw = {"tokenizer": tokenizer} if tokenizer else {}
    result = Trainer(_tc(Path(root), out, world, max_steps=10, save_interval=100, eval_interval=100, **kw)).train()
    Path(root, out, f"result-{dist.get_rank()}.json").write_text(json.dumps(
        {"steps": result.steps, "interrupted": result.interrupted, "checkpoint": Path(result.checkpoint).name}))


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step_and_saves(workspace):
    world, out = 2, "signalled"
    tokenizer = workspace / "cli" / "tokenizer.json"
    spawn(_signal_worker, world, str(workspace), out, world, str(tokenizer) if tokenizer.is_file() else None,
          timeout_s=180)
    results = [json.loads((workspace / out / f"result-{r}.json").read_text()) for r in range(world)]
    assert results == [{"steps": 3, "interrupted": True, "checkpoint": "step-3"}] * world
    assert [r["step"] for r in _records(workspace / out)] == [1, 2, 3]
    resumed = Trainer(TrainConfig(out=str(workspace / out), resume=True, max_steps=4, progress=False)).train()
    assert resumed.steps == 4 and not resumed.interrupted


def _compiled_worker(root: str, out: str, world: int, tokenizer: str | None) -> None:
    kw = {"tokenizer": tokenizer} if tokenizer else {}
    trainer = Trainer(_tc(Path(root), out, world, compile="on", eval_interval=100, **kw), ParallelConfig(ep=2))
    trainer.train()
    assert all(layer.self_attn._compiled_call_impl is not None for layer in trainer.model.model.layers)


@pytest.mark.slow
def test_compile_on_in_a_distributed_run_matches_eager_single_process(workspace):
    """--compile on under torchrun compiles attention, dense MLPs and shared experts (static
    shapes) inside FSDP2 + EP; the losses stay those of the eager single-process run."""
    world, out = 2, "compiled"
    tokenizer = workspace / "cli" / "tokenizer.json"
    spawn(_compiled_worker, world, str(workspace), out, world, str(tokenizer) if tokenizer.is_file() else None,
          timeout_s=500)
    ref = _reference(workspace, "ref_compiled", world, workspace / out / "tokenizer.json")
    got, want = _records(workspace / out), _records(ref.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):  # fused kernels reorder sums: 1e-4, not 1e-5
            assert g[key] == pytest.approx(w[key], rel=1e-4), (g["step"], key, g[key], w[key])
