import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import leanmoe
from leanmoe.data.sources import DataError
from leanmoe.train import TrainConfig, Trainer, TrainingError
from leanmoe.train import run_checkpoint as ckpt_mod
from leanmoe.train import memory as memory_mod
from leanmoe.train import trainer as trainer_mod
from leanmoe.train.run_checkpoint import latest_checkpoint, list_checkpoints
from tests.util import MICRO_TRAIN, write_corpus

MICRO = MICRO_TRAIN


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LEANMOE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    write_corpus(folder)
    (tmp_path / "micro.json").write_text(json.dumps(MICRO))
    return folder


def _tc(tmp_path, corpus, name="run", **kw) -> TrainConfig:
    base = dict(config=str(tmp_path / "micro.json"), data=[str(corpus)], out=str(tmp_path / name), seq_len=32,
                batch_size=8, lr=3e-3, warmup_steps=3, eval_batches=2, sample_tokens=8, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_training_run_learns_and_writes_a_complete_run_folder(tmp_path, corpus):
    trainer = Trainer(_tc(tmp_path, corpus, max_steps=40, eval_interval=10, save_interval=20))
    result = trainer.train()
    run = Path(result.run_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_second"} <= set(r)
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [10, 20, 30, 40] and all(r["val_bpb"] > 0 for r in vals)
    first, last = sum(r["lm_loss"] for r in records[:5]) / 5, sum(r["lm_loss"] for r in records[-5:]) / 5
    assert last < first - 1.5, (first, last)
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    # warm-up, flat, then the last 35% decaying (wsd)
    assert records[0]["lr"] == pytest.approx(1e-3) and records[2]["lr"] == pytest.approx(3e-3)
    assert records[10]["lr"] == records[24]["lr"] == pytest.approx(3e-3) and records[-1]["lr"] < records[24]["lr"]
    assert records[30]["lr"] < records[24]["lr"]
    for name in ("report.md", "loss.png", "expert_load.png", "tokenizer.json", "tokenizer_config.json"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    for section in ("## Run", "## Compute and cost", "MFU is not meaningful on the CPU", "## Expert load balance",
                    "| layer 1 |", "| MTP 1 |", "## Samples"):
        assert section in report, section
    assert [p.name for p in list_checkpoints(run)] == ["step-20", "step-40"]
    assert latest_checkpoint(run).name == "step-40"
    # the run folder loads as a model (latest checkpoint), equal to the trained one
    model = leanmoe.from_pretrained(run).eval()
    trainer.model.eval()
    ids = torch.randint(0, MICRO["vocab_size"], (2, 16))
    torch.testing.assert_close(model(ids), trainer.model(ids))
    # the router biases moved (aux-loss-free balancing ran every step) and were saved
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0
    torch.testing.assert_close(bias, trainer.model.model.layers[1].mlp.gate.e_score_correction_bias)


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in the trainer catches it."""


def test_kill_and_resume_equals_uninterrupted_run(tmp_path, corpus, monkeypatch):
    full = Trainer(_tc(tmp_path, corpus, "full", max_steps=12, save_interval=4, eval_interval=6)).train()
    reference = _losses(full.run_dir)

    real_lr_at = trainer_mod.lr_at

    def dying_lr_at(step, *a, **k):
        if step == 6:  # killed after completing step 6; the last checkpoint is step 4
            raise _Killed()
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(trainer_mod, "lr_at", dying_lr_at)
    with pytest.raises(_Killed):
        Trainer(_tc(tmp_path, corpus, "killed", max_steps=12, save_interval=4, eval_interval=6)).train()
    run = tmp_path / "killed"
    assert len(_losses(run)) == 6 and latest_checkpoint(run).name == "step-4"
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)

    resumed = Trainer(TrainConfig(out=str(run), resume=True, progress=False)).train()
    assert resumed.steps == 12
    assert _losses(run) == reference  # exactly: same data, weights, optimizer state, schedule


def test_a_run_trained_in_turns_equals_one_call_and_its_clock_skips_the_pauses(tmp_path, corpus):
    straight = Trainer(_tc(tmp_path, corpus, "straight", max_steps=10, eval_interval=4)).train()
    trainer = Trainer(_tc(tmp_path, corpus, "turns", max_steps=10, eval_interval=4))
    results, durations = [], []
    while not results or results[-1].paused:
        t0 = time.perf_counter()
        results.append(trainer.train(stop_after=3))
        durations.append(time.perf_counter() - t0)
        time.sleep(0.2)  # the other run's turn: not this run's time
    assert [(r.steps, r.paused) for r in results] == [(3, True), (6, True), (9, True), (10, False)]
    assert [r.report for r in results[:-1]] == [None] * 3 and results[-1].report.is_file()
    assert not results[-1].interrupted and results[-1].checkpoint.name == "step-10"
    assert _losses(results[-1].run_dir) == _losses(straight.run_dir)  # same steps, data and schedule
    records = [json.loads(line) for line in (results[-1].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert [r["step"] for r in records if "val_bpb" in r] == [4, 8, 10]
    # each call adds at most its own duration to the clock; the pauses between calls add nothing
    clocks = [0.0] + [r.elapsed for r in results]
    for before, after, spent in zip(clocks, clocks[1:], durations):
        assert 0 < after - before <= spent
    assert results[-1].elapsed <= sum(durations) and results[-1].tokens_per_second > 0


def test_a_pause_whose_evaluation_spends_the_time_budget_ends_the_run_in_that_call(tmp_path, corpus, monkeypatch):
    """As in one call, the evaluation that spends the budget is followed by one last step, which
    evaluates and saves; the run does not pause with its budget gone (the next turn would train nothing)."""
    trainer = Trainer(_tc(tmp_path, corpus, time_budget=1000.0, eval_interval=4))
    offset, real_clock, real_evaluate = [0.0], time.perf_counter, trainer.evaluate
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])

    def evaluate(**kw):
        out = real_evaluate(**kw)
        if trainer.state.step == 4:
            offset[0] += 1000.0  # this evaluation takes the whole budget
        return out
    trainer.evaluate = evaluate
    results = [trainer.train(stop_after=2)]
    results.append(trainer.train(stop_after=2))
    assert [(r.steps, r.paused) for r in results] == [(2, True), (5, False)]
    assert results[-1].checkpoint.name == "step-5" and results[-1].report.is_file()
    records = [json.loads(line) for line in (results[-1].run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_bpb" in r] == [4, 5]


def test_resume_with_a_new_budget_and_a_torn_metrics_line(tmp_path, corpus):
    first = Trainer(_tc(tmp_path, corpus, max_tokens=2 * 8 * 32, eval_interval=100)).train()  # 2 steps
    assert first.steps == 2
    with open(first.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')  # a crash in the middle of a line
    # --max-steps replaces the saved token budget (else the run would stop at once)
    resumed = Trainer(TrainConfig(out=str(first.run_dir), resume=True, max_steps=4, progress=False)).train()
    assert resumed.steps == 4
    assert [m["step"] for m in map(json.loads, (first.run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in m] == [1, 2, 3, 4]



def test_a_run_saved_before_expert_lr_scale_existed_resumes_at_scale_1(tmp_path, corpus):
    from leanmoe.train.run_checkpoint import STATE_FILE

    first = Trainer(_tc(tmp_path, corpus, max_steps=1, eval_interval=100, expert_lr_scale=1.0)).train()
    for path in set((first.run_dir / "checkpoints").rglob(STATE_FILE)):
        state = json.loads(path.read_text())
        del state["train_config"]["expert_lr_scale"]  # as written before the key existed
        path.write_text(json.dumps(state))
    resumed = Trainer(TrainConfig(out=str(first.run_dir), resume=True, max_steps=2, progress=False))
    assert resumed.train().steps == 2 and resumed.tc.expert_lr_scale == 1.0  # not today's default
    assert len(resumed.optimizer.param_groups) == 2  # the saved optimizer's groups: no experts group


def test_a_run_on_the_former_default_schedule_resumes_on_it(tmp_path, corpus):
    first = Trainer(_tc(tmp_path, corpus, max_steps=1, eval_interval=100, schedule="cosine", decay_fraction=0.2)).train()
    resumed = Trainer(TrainConfig(out=str(first.run_dir), resume=True, max_steps=2, progress=False))
    assert resumed.train().steps == 2
    assert resumed.tc.schedule == "cosine" and resumed.tc.decay_fraction == 0.2  # not today's wsd and 0.35
    assert TrainConfig.from_dict({}).schedule == "cosine"  # a config saved without the key
    assert TrainConfig.from_dict({}).decay_fraction == 0.2 != TrainConfig().decay_fraction


def test_checkpoints_past_the_shard_size_are_split_and_resume_exactly(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "SHARD_SIZE", "16KB")
    kw = dict(schedule="constant", warmup_steps=1, save_interval=2, eval_interval=100)  # lr independent of budget
    full = Trainer(_tc(tmp_path, corpus, "full", max_steps=4, **kw)).train()
    part = Trainer(_tc(tmp_path, corpus, "part", max_steps=2, **kw)).train()
    ckpt = latest_checkpoint(part.run_dir)
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 1 and (ckpt / "model.safetensors.index.json").is_file()
    state_dir = ckpt / "trainer_state"
    assert len(list(state_dir.glob("optimizer-*-of-*.safetensors"))) > 1 and not (state_dir / "optimizer.safetensors").exists()
    Trainer(TrainConfig(out=str(part.run_dir), resume=True, max_steps=4, progress=False)).train()
    assert _losses(part.run_dir) == _losses(full.run_dir)


def test_checkpoint_writes_are_atomic(tmp_path, corpus, monkeypatch):
    real = ckpt_mod.save_pretrained
    calls = {"n": 0}

    def crashing_save(model, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way: a file written, then a crash
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_bytes(b"partial")
            raise OSError("disk full")
        return real(model, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_pretrained", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        Trainer(_tc(tmp_path, corpus, max_steps=12, save_interval=4, eval_interval=100)).train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-4"]  # no half-written folder
    assert latest_checkpoint(tmp_path / "run").name == "step-4"
    leanmoe.from_pretrained(tmp_path / "run")  # the last good checkpoint is intact
    monkeypatch.setattr(ckpt_mod, "save_pretrained", real)
    assert Trainer(TrainConfig(out=str(tmp_path / "run"), resume=True, progress=False)).train().steps == 12


def test_keep_last_and_gradient_accumulation(tmp_path, corpus):
    a = Trainer(_tc(tmp_path, corpus, "a", max_steps=6, save_interval=1, keep_last=2, eval_interval=100)).train()
    assert [p.name for p in list_checkpoints(a.run_dir)] == ["step-5", "step-6"]
    b = Trainer(_tc(tmp_path, corpus, "b", max_steps=1, micro_batch_size=2, eval_interval=100)).train()
    # four micro-batches of 2 see the same windows as one batch of 8 only if the loader draws
    # per micro-step; what must hold is that accumulation trains at all and logs the full batch
    rec = json.loads((Path(b.run_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["tokens"] == 8 * 32 and rec["loss"] > 0


def test_dense_model_trains_and_reports(tmp_path, corpus):
    dense = {**MICRO, "first_k_dense_replace": 3}  # 2 layers + 1 MTP module, all dense
    (tmp_path / "dense.json").write_text(json.dumps(dense))
    result = Trainer(_tc(tmp_path, corpus, config=str(tmp_path / "dense.json"), max_steps=3)).train()
    assert result.steps == 3 and result.val_loss is not None
    assert "No MoE layers in this model." in (Path(result.run_dir) / "report.md").read_text()


def test_mtp_layers_overrides_the_config_and_an_mtp_weight_needs_a_module(tmp_path, corpus):
    result = Trainer(_tc(tmp_path, corpus, name="nomtp", mtp_layers=0, max_steps=2)).train()
    saved = json.loads((latest_checkpoint(result.run_dir) / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 0 and MICRO["num_nextn_predict_layers"] == 1
    assert all(json.loads(line)["mtp_loss"] == 0 for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(TrainingError, match="no MTP module .* --mtp-layers 1"):
        Trainer(_tc(tmp_path, corpus, name="w", mtp_layers=0, mtp_weight=0.3, max_steps=1)).train()
    assert not (tmp_path / "w").exists()  # refused before anything was written
    with pytest.raises(TrainingError, match="mtp-layers"):
        Trainer(_tc(tmp_path, corpus, name="bad", mtp_layers=-1, max_steps=1)).train()


def test_fp8_flag_trains_in_fp8(tmp_path, corpus):
    trainer = Trainer(_tc(tmp_path, corpus, fp8=True, max_steps=3))
    result = trainer.train()
    from leanmoe.kernels.fp8_linear import Fp8Linear
    from leanmoe.train.fp8 import Fp8Experts

    assert isinstance(trainer.model.model.layers[0].self_attn.o_proj, Fp8Linear)
    assert isinstance(trainer.model.model.layers[1].mlp.experts, Fp8Experts)
    assert result.steps == 3 and math.isfinite(result.final_loss)
    # FP8 is how the run trained, not part of the architecture: the trainer state records it, the
    # model config does not, and the checkpoint loads (and serves) as a plain model
    ckpt = Path(result.run_dir) / "checkpoints" / "latest"
    assert json.loads((ckpt / "trainer_state" / "trainer_state.json").read_text())["train_config"]["fp8"] is True
    assert "fp8" not in json.loads((ckpt / "config.json").read_text())
    assert type(leanmoe.from_pretrained(result.run_dir).model.layers[0].self_attn.o_proj) is torch.nn.Linear


def test_time_budget(tmp_path, corpus):
    result = Trainer(_tc(tmp_path, corpus, time_budget=2.0, eval_interval=1000)).train()
    records = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert result.elapsed >= 2.0 and result.steps == len(records) >= 1
    # it stopped at the first step that ended past the budget (whatever the machine's speed)
    assert records[-1]["elapsed"] >= 2.0 and all(r["elapsed"] < 2.0 for r in records[:-1])
    assert "val_loss" in records[-1]  # the final step always evaluates


def test_bad_inputs_fail_clearly(tmp_path, corpus):
    with pytest.raises(DataError, match="no such file or folder"):
        Trainer(_tc(tmp_path, corpus, data=[str(tmp_path / "missing")], max_steps=1)).train()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(DataError, match="no text found"):
        Trainer(_tc(tmp_path, corpus, data=[str(empty)], max_steps=1)).train()
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    with pytest.raises(DataError, match="blob.txt"):
        Trainer(_tc(tmp_path, corpus, data=[str(binary)], max_steps=1)).train()
    with pytest.raises(TrainingError, match="max_position_embeddings"):
        Trainer(_tc(tmp_path, corpus, seq_len=4096, max_steps=1)).train()
    with pytest.raises(TrainingError, match="lower --micro-batch-size"):
        Trainer(_tc(tmp_path, corpus, batch_size=10**7, micro_batch_size=10**7, max_steps=1)).train()
    with pytest.raises(TrainingError, match="multiple of --micro-batch-size"):
        Trainer(_tc(tmp_path, corpus, batch_size=8, micro_batch_size=3, max_steps=1)).train()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    trainer = Trainer(_tc(tmp_path, corpus, max_steps=10, save_interval=2, eval_interval=100))
    trainer.setup()
    real = trainer.model.compute_loss
    calls = {"n": 0}

    def poisoned(x, y):
        calls["n"] += 1
        out = real(x, y)
        if calls["n"] >= 3:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.compute_loss = poisoned
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*lower --lr.*step-2"):
        trainer.train()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-2"]
    model = leanmoe.from_pretrained(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_default_micro_batch_shrinks_to_free_memory(tmp_path, corpus, monkeypatch):
    # free memory for a micro-batch of 2 but not of 8: the default shrinks, the batch stays 8
    cfg = leanmoe.ModelConfig.from_pretrained(tmp_path / "micro.json")
    room = memory_mod.estimate_step_memory(cfg, 2, 32) / 0.9 + 1
    assert memory_mod.estimate_step_memory(cfg, 4, 32) > 0.9 * room
    monkeypatch.setattr(trainer_mod, "available_memory", lambda device: int(room))
    t = Trainer(_tc(tmp_path, corpus, max_steps=1))
    t.train()
    assert (t.tc.batch_size, t.tc.micro_batch_size) == (8, 2)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1
    with pytest.raises(TrainingError, match="lower --micro-batch-size"):  # an explicit one is kept, and refused
        Trainer(_tc(tmp_path, corpus, "b", micro_batch_size=8, max_steps=1)).train()


def test_cli_end_to_end_and_error_exit(tmp_path, corpus):
    env = {**os.environ, "LEANMOE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "leanmoe", "train", "--config", str(tmp_path / "micro.json"), "--data", str(corpus),
           "--out", str(tmp_path / "cli"), "--max-steps", "3", "--seq-len", "32", "--batch-size", "4", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "checkpoints/step-3" in done.stdout and (tmp_path / "cli" / "report.md").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1 and "pass --resume" in again.stderr
    bad = subprocess.run(cmd[:-9] + ["--out", str(tmp_path / "cli2"), "--seq-len", "999", "--max-steps", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "max_position_embeddings (128)" in bad.stderr


def test_report_includes_an_lm_eval_benchmark_when_asked(tmp_path, corpus):
    from tests.util import write_local_tasks

    (tmp_path / "tasks").mkdir()
    tasks = write_local_tasks(tmp_path / "tasks")
    result = Trainer(_tc(tmp_path, corpus, max_steps=2, eval_interval=100, eval_tasks=["leanmoe_ll"],
                         eval_include_path=str(tasks))).train()
    report = (Path(result.run_dir) / "report.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness, final checkpoint)" in report and "| leanmoe_ll | acc |" in report


def test_expert_lr_scale_follows_the_schedule(tmp_path, corpus):
    trainer = Trainer(_tc(tmp_path, corpus, max_steps=2, eval_interval=100, expert_lr_scale=3.0))
    trainer.train()
    lr = json.loads((Path(trainer.run_dir) / "metrics.jsonl").read_text().splitlines()[-1])["lr"]
    groups = trainer.optimizer.param_groups
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 1.0, 3.0]
    assert groups[0]["lr"] == pytest.approx(lr) and groups[2]["lr"] == pytest.approx(3 * lr)
    with pytest.raises(TrainingError, match="expert-lr-scale"):
        Trainer(_tc(tmp_path, corpus, "bad", max_steps=1, expert_lr_scale=0.0)).train()
