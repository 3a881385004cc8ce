"""parallelize() and the full-state helpers at the model level (leanmoe/parallel/parallelize.py,
leanmoe/parallel/full_state.py). Loss parity of whole training runs is in test_trainer.py."""

from __future__ import annotations

import copy

import pytest
import torch

import leanmoe
from leanmoe.model import Transformer
from leanmoe.parallel.launch import strip_nproc, torchrun_command
from leanmoe.parallel.parallelize import apply_activation_checkpointing, clip_grad_norm_
from tests.parallel.dist_util import Checks, assert_check, load_checks, spawn
from tests.util import micro_config


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(micro_config(n_routed_experts=8))


def _parallel_worker(out_dir: str) -> None:
    import torch.distributed as dist

    from leanmoe.parallel.full_state import expert_parallel_params, full_model_state_dict, load_full_model_state_dict
    from leanmoe.parallel.groups import ParallelDims
    from leanmoe.parallel.parallelize import parallelize

    rank, world = dist.get_rank(), dist.get_world_size()
    checks = Checks()
    dims = ParallelDims.build(2, torch.device("cpu"), 8)
    ids = torch.randint(0, 97, (2 * world, 12), generator=torch.Generator().manual_seed(3))
    mine = ids[2 * rank: 2 * rank + 2]
    ref = _model()

    # a single-process state loaded into the sharded model gathers back unchanged (1 -> 2 ranks)
    other = Transformer(micro_config(n_routed_experts=8))  # different weights until loaded
    parallelize(other, dims)
    load_full_model_state_dict(other, ref.state_dict())
    back = full_model_state_dict(other)
    with checks("full_state_round_trip"):
        if rank == 0:
            assert set(back) == set(ref.state_dict())
            for name, t in ref.state_dict().items():
                torch.testing.assert_close(back[name], t, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        else:
            assert back == {}

    # built on the meta device, each rank initialising only its shards: the whole model's weights
    from leanmoe.parallel.parallelize import materialize

    whole = Transformer(micro_config(n_routed_experts=8))
    whole.init_weights(seed=1234)
    with torch.device("meta"):
        meta = Transformer(micro_config(n_routed_experts=8))
    parallelize(meta, dims)
    materialize(meta, "cpu", 1234)
    back = full_model_state_dict(meta)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in meta.parameters())
    with checks("meta_init_matches_whole_model"):
        assert local < 0.75 * sum(p.numel() for p in whole.parameters())  # only this rank's shards exist
        if rank == 0:
            assert set(back) == set(whole.state_dict())
            for name, t in whole.state_dict().items():
                torch.testing.assert_close(back[name], t, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

    # a single-process checkpoint resumes into the sharded model: weights and AdamW moments,
    # each rank reading only the tensors (and expert rows) its shards need
    import torch.distributed as dist

    from leanmoe.parallel.full_state import gather_full
    from leanmoe.train.run_checkpoint import load_checkpoint, save_checkpoint
    from leanmoe.train.optim import build_optimizer

    single = _model()
    opt = build_optimizer(single, 1e-2)
    single.compute_loss(ids, ids).loss.backward()
    opt.step()
    if rank == 0:
        save_checkpoint(out_dir, 1, single, opt, {"tokens": 0, "elapsed": 0.0})
    dist.barrier()
    with torch.device("meta"):
        sharded = Transformer(micro_config(n_routed_experts=8))
    parallelize(sharded, dims)
    materialize(sharded, "cpu", 99)  # other weights until loaded
    sharded_opt = build_optimizer(sharded, 1e-2)
    load_checkpoint(f"{out_dir}/checkpoints/step-1", sharded, sharded_opt)
    back = full_model_state_dict(sharded)
    eps = expert_parallel_params(sharded)
    moments = {name: gather_full(sharded_opt.state[p]["exp_avg"], eps.get(name))
               for name, p in sharded.named_parameters()}
    with checks("resume_into_sharded_model"):
        if rank == 0:
            for name, t in single.state_dict().items():
                torch.testing.assert_close(back[name], t, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
            for name, p in single.named_parameters():
                torch.testing.assert_close(moments[name], opt.state[p]["exp_avg"], rtol=0, atol=0)

    # the sharded model saves by streaming into many small files (rank 0 holds one shard at a
    # time); what it wrote is the single-process model, and resumes into a sharded one again
    from leanmoe.train import run_checkpoint as ckpt_mod

    ckpt_mod.SHARD_SIZE = "16KB"
    saved = save_checkpoint(f"{out_dir}/par", 2, sharded, sharded_opt, {"tokens": 0, "elapsed": 0.0})
    again = Transformer(micro_config(n_routed_experts=8))
    parallelize(again, dims)
    again_opt = build_optimizer(again, 1e-2)
    load_checkpoint(saved, again, again_opt)
    back = full_model_state_dict(again)
    with checks("streamed_parallel_save"):
        if rank == 0:
            assert len(list(saved.glob("model-*-of-*.safetensors"))) > 2
            assert len(list((saved / "trainer_state").glob("optimizer-*-of-*.safetensors"))) > 2
            loaded = leanmoe.from_pretrained(saved)
            for name, t in single.state_dict().items():
                torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
                torch.testing.assert_close(back[name], t, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

    # mixed precision: bf16 compute, fp32 master weights and reduction; the router stays fp32
    mp = parallelize(copy.deepcopy(_model()), dims, param_dtype=torch.bfloat16)
    seen = {}
    gate = mp.moe_layers()[0].gate
    gate.register_forward_pre_hook(lambda m, a: seen.update(gate=m.weight.dtype))
    loss = mp.compute_loss(mine, mine).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    norm = clip_grad_norm_(mp.parameters(), 1e9)
    want = ref.compute_loss(ids, ids).loss
    want.backward()
    with checks("mixed_precision_bf16"):
        assert seen["gate"] == torch.float32
        assert all(p.dtype == torch.float32 for p in mp.parameters())
        torch.testing.assert_close(total / world, want.detach(), rtol=2e-2, atol=0)
        want_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
        torch.testing.assert_close(norm, want_norm, rtol=5e-2, atol=0)

    with checks("bad_ep_is_explained"):
        with pytest.raises(ValueError, match="must divide the number of processes"):
            ParallelDims.build(3, torch.device("cpu"))
        with pytest.raises(ValueError, match="n_routed_experts"):
            ParallelDims.build(2, torch.device("cpu"), n_routed_experts=9)
    checks.save(out_dir)


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallelize")
    spawn(_parallel_worker, 2, str(folder))
    return load_checks(folder, 2)


@pytest.mark.parametrize("check", ["full_state_round_trip", "meta_init_matches_whole_model",
                                   "resume_into_sharded_model", "streamed_parallel_save", "mixed_precision_bf16",
                                   "bad_ep_is_explained"])
def test_parallelize(parallel_results, check):
    assert_check(parallel_results, check)


def test_activation_checkpointing_saves_less_and_changes_nothing():
    plain, ckpt = _model(), _model()
    apply_activation_checkpointing(ckpt)
    assert set(dict(ckpt.named_parameters())) == set(dict(plain.named_parameters()))  # HF names kept
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))

    def run(model):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model.compute_loss(ids, ids).loss
        loss.backward()
        return loss, sum(saved), {n: p.grad for n, p in model.named_parameters()}

    loss_a, saved_a, grads_a = run(plain)
    loss_b, saved_b, grads_b = run(ckpt)
    assert saved_b < 0.7 * saved_a, (saved_a, saved_b)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # recomputation does not count routed tokens twice
    torch.testing.assert_close(ckpt.expert_load(), plain.expert_load())


def test_clip_grad_norm_matches_torch_in_one_process():
    a, b = _model(), _model()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    for m in (a, b):
        m.compute_loss(ids, ids).loss.backward()
    na = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.1)
    nb = clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(nb, na, rtol=1e-6, atol=0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_nproc_shortcut_builds_a_torchrun_command():
    argv = ["train", "--nproc", "4", "--ep", "2", "--nproc=3", "--max-steps", "5"]
    assert strip_nproc(argv) == ["train", "--ep", "2", "--max-steps", "5"]
    cmd = torchrun_command(argv, 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert cmd[6:] == ["leanmoe", "train", "--ep", "2", "--max-steps", "5"]
    with pytest.raises(ValueError, match="at least 1"):
        torchrun_command(argv, 0)
