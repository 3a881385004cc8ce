"""The plain helpers of bench/moe_vs_dense.py (the study of issue #14): run order, interpolation,
compute multiplier, summary rows."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("moe_vs_dense", Path(__file__).parents[1] / "bench" / "moe_vs_dense.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def _run(model, seed, bpb, tokens, curve, budget="10m", budget_s=600.0, tps=1000.0, dtype="bf16"):
    return {"corpus": "stdlib", "budget": budget, "budget_s": budget_s, "seed": seed, "model": model, "dtype": dtype,
            "val_bpb": bpb, "tokens": tokens, "tokens_per_second": tps,
            "curve": [[i + 1, t, 10.0 * (i + 1), b] for i, (t, b) in enumerate(curve)]}


def test_pairs_run_back_to_back_with_alternating_order():
    plan = study.run_plan(["a"], ["10m", "30m"], [0, 1])
    assert [m for *_, m in plan] == ["MoE", "dense", "dense", "MoE", "MoE", "dense", "dense", "MoE"]
    assert plan[0][:3] == plan[1][:3] == ("a", "10m", 0) and plan[2][:3] == ("a", "10m", 1)


def test_tokens_to_reach_interpolates_and_says_never():
    curve = [(100, 3.0), (200, 2.5), (300, 2.0)]
    assert study.tokens_to_reach(curve, 2.25) == pytest.approx(250.0)
    assert study.tokens_to_reach(curve, 2.5) == pytest.approx(200.0)
    assert study.tokens_to_reach(curve, 1.9) is None
    assert study.tokens_to_reach(curve, 3.5) == 100.0  # already below at the first evaluation
    assert study.tokens_to_reach([], 1.0) is None


def test_multiplier_reached_not_reached_and_bounded_by_a_longer_run():
    moe = _run("MoE", 0, 2.2, 1000, [(500, 2.6), (1000, 2.2)])
    assert study.multiplier_text(moe, _run("dense", 0, 2.0, 1100, [(500, 2.4), (1100, 2.0)]), []) == "0.80x"
    dense = _run("dense", 0, 2.3, 1100, [(550, 2.7), (1100, 2.3)])
    assert study.multiplier_text(moe, dense, []) == "not reached (>1.10x)"
    longer = _run("dense", 0, 2.0, 3300, [(1100, 2.4), (2200, 2.2), (3300, 2.0)], budget="30m", budget_s=1800.0)
    assert study.multiplier_text(moe, dense, [longer]) == "not reached (>1.10x, <=2.20x by the 30m run)"
    early = _run("dense", 0, 2.0, 1100, [(800, 2.1), (1100, 2.0)])  # below the MoE's final bpb at its first eval
    assert study.multiplier_text(moe, early, []) == "<=0.80x"


def test_summary_target_needs_every_seed():
    runs = [_run("MoE", 0, 2.10, 1000, [(1000, 2.10)]), _run("dense", 0, 2.15, 1100, [(1100, 2.15)]),
            _run("MoE", 1, 2.10, 1000, [(1000, 2.10)]), _run("dense", 1, 2.12, 1100, [(1100, 2.12)]),
            _run("MoE", 2, 2.0, 1000, [(1000, 2.0)])]  # seed 2's dense run has not finished: left out
    (row,) = study.summarize(runs)
    assert row["seeds"] == [0, 1] and row["margins"] == pytest.approx([0.05, 0.02])
    assert row["target"] == 0.03 and not row["target_met"]
    assert study.target_margin(1800) == 0.05
    text = study.markdown([row], None, ["busy"])
    assert "+0.0500 / +0.0200" in text and "no (>= 0.03" in text and "not quiet" in text
    assert "--equal-steps" not in text  # no such runs, no such line


def test_summary_reports_the_equal_step_bound_per_seed():
    runs = [_run("MoE", 0, 2.10, 1000, [(1000, 2.10)]), _run("dense", 0, 2.05, 1200, [(1200, 2.05)]),
            _run(study.EQUAL, 0, 2.03, 1200, [(1200, 2.03)]),
            _run("MoE", 1, 2.10, 1000, [(1000, 2.10)]), _run("dense", 1, 2.06, 1200, [(1200, 2.06)])]
    (row,) = study.summarize(runs)
    assert row["margins"] == pytest.approx([-0.05, -0.04])
    ((seed, margin),) = row["equal_step_margins"]  # seed 1 has no step-count run
    assert seed == 0 and margin == pytest.approx(0.02)
    text = study.markdown([row], None, [])
    assert "`--equal-steps`" in text and "stdlib 10m bf16 seed 0 +0.0200." in text


def test_summary_reports_the_larger_final_evaluation_when_every_run_has_it():
    runs = [_run("MoE", 0, 2.10, 1000, [(1000, 2.10)]), _run("dense", 0, 2.15, 1100, [(1100, 2.15)]),
            _run("MoE", 1, 2.10, 1000, [(1000, 2.10)]), _run("dense", 1, 2.12, 1100, [(1100, 2.12)])]
    (row,) = study.summarize(runs)
    assert "final_margins" not in row and "evaluated again" not in study.markdown([row], None, [])
    for r, bpb, tokens in zip(runs, [2.11, 2.15, 2.08, 2.12], [8192, 8192, 8192, 4096]):
        r["final_eval"] = {"val_bpb": bpb, "val_loss": 1.0, "tokens": tokens}
    (row,) = study.summarize(runs)
    assert row["final_margins"] == pytest.approx([0.04, 0.04]) and row["final_target_met"]
    assert row["margins"] == pytest.approx([0.05, 0.02]) and not row["target_met"]  # the table's verdict is its own
    text = study.markdown([row], None, [])
    assert "stdlib 10m bf16 (4,096 tokens) +0.0400 / +0.0400, target met." in text


def test_final_evaluation_reads_more_of_the_validation_split(tmp_path, monkeypatch):
    import json

    from leanmoe.train import TrainConfig, Trainer
    from tests.util import MICRO_TRAIN, write_corpus

    monkeypatch.setenv("LEANMOE_CACHE", str(tmp_path / "cache"))
    write_corpus(tmp_path / "corpus")
    (tmp_path / "micro.json").write_text(json.dumps(MICRO_TRAIN))
    tc = TrainConfig(config=str(tmp_path / "micro.json"), data=[str(tmp_path / "corpus")], out=str(tmp_path / "run"),
                     max_steps=1, seq_len=16, batch_size=2, eval_batches=1, sample_tokens=0, progress=False)
    trainer = Trainer(tc)
    trainer.train()
    small, big = study.final_evaluation(trainer, 1), study.final_evaluation(trainer, 10**6)
    windows = (len(trainer.shards.val) - 1) // 16
    assert small["tokens"] == trainer.tc.micro_batch_size * 16 < big["tokens"] == windows * 16
    assert small["val_bpb"] == pytest.approx(trainer.state.last_eval["val_bpb"])  # the trainer's own windows
    assert big["val_bpb"] != small["val_bpb"]


@pytest.mark.parametrize("bf16", [False, True])
def test_step_split_times_the_expert_layout_training_runs(bf16):
    """time_moe times MoE.gather_rows / experts / combine_rows in the layout MoE.routed picks under
    the same autocast: padded expert rows on a CPU in bf16, packed in fp32."""
    import torch

    from leanmoe.kernels.grouped_gemm import CPU_ONEDNN_ROW_ALIGN
    from leanmoe.model.moe import MoE
    from tests.util import micro_config

    moe = MoE(micro_config(n_group=1, topk_group=1)).train()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    calls = []

    def timed(fn, inputs, grad_in, grad_out=(0,)):  # as step_split's: under the trainer's autocast
        with autocast:
            calls.append((inputs, fn(*inputs)))
            return study.time_fwd_bwd(fn, inputs, grad_in, grad_out, 1, lambda: None)

    parts = study.time_moe(moe, torch.randn(2, 9, 32), timed, autocast)
    assert list(parts) == ["router", "dispatch-sort", "expert GEMMs", "combine", "check"]
    (_, dispatched), ((x_PD, offs_E), _), ((_, _, row_M, _), combined) = calls[1:4]
    assert torch.equal(dispatched[1], offs_E) and dispatched[0].shape == x_PD.shape  # the layout the GEMMs got
    assert int(offs_E[-1]) == x_PD.shape[0] and combined.shape == (2 * 9, 32)
    if bf16:
        assert row_M is not None and torch.all(offs_E % CPU_ONEDNN_ROW_ALIGN == 0)
        assert x_PD.shape[0] > 2 * 9 * moe.top_k  # the padding rows are timed too
    else:
        assert row_M is None and x_PD.shape[0] == 2 * 9 * moe.top_k


def test_set_overrides_preset_fields_and_names_a_bad_one():
    assert study.parse_overrides(["num_nextn_predict_layers=0", "scoring_func=softmax", "n_group=1"]) == {
        "num_nextn_predict_layers": 0, "scoring_func": "softmax", "n_group": 1}
    for bad in ("num_nextn_predict_layers", "no_such_field=1"):
        with pytest.raises(ValueError, match="KEY=VALUE with KEY a ModelConfig field"):
            study.parse_overrides([bad])


def _study_cli(*argv: str):
    """bench/moe_vs_dense.py run as a user runs it, in a process of its own."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(Path(study.__file__)), *argv], capture_output=True, text=True,
                          timeout=300)


def test_resuming_a_study_with_another_config_stops_before_any_run(tmp_path):
    from leanmoe import ModelConfig

    ModelConfig.from_preset("tiny").save(tmp_path / "MoE.config.json")  # a study of the preset as it is
    (tmp_path / "runs").mkdir()
    proc = _study_cli("--out", str(tmp_path), "--resume-study", "--set", "num_nextn_predict_layers=1", "--no-split",
                      "--corpora", "stdlib")
    assert proc.returncode != 0 and "holds a study of another MoE config" in proc.stderr
    assert ModelConfig.from_pretrained(tmp_path / "MoE.config.json") == ModelConfig.from_preset("tiny")  # untouched


def test_counts_below_their_least_value_are_refused_before_any_run(tmp_path):
    for flag, value in (("--final-eval-batches", "-1"), ("--eval-interval", "0"), ("--eval-batches", "0")):
        proc = _study_cli("--out", str(tmp_path / "s"), flag, value)
        assert proc.returncode == 2 and f"{flag} must be >= " in proc.stderr, (flag, proc.stderr)
    assert not (tmp_path / "s").exists()  # refused before the study folder was made


def test_expert_learning_rate_scale_applies_to_the_moe_runs_only():
    from argparse import Namespace

    args = Namespace(expert_lr_scale=0.5)
    assert study.expert_lr_scale(args, "MoE") == study.expert_lr_scale(args, study.EQUAL) == 0.5
    assert study.expert_lr_scale(args, "dense") == 1.0  # the dense twin has no routed experts


def test_a_pair_trains_in_turns_on_clocks_of_its_own(tmp_path):
    """The whole study on a small corpus: both runs of the pair take turns of 3 steps, each turn to
    the run whose clock is behind, and each spends its own budget, so together they take at least
    twice the budget."""
    import json
    import time

    from tests.util import write_corpus

    write_corpus(tmp_path / "corpus")
    t0 = time.perf_counter()
    proc = _study_cli("--out", str(tmp_path / "s"), "--corpora", str(tmp_path / "corpus"), "--budgets", "4s",
                      "--seeds", "0", "--no-split", "--seq-len", "32", "--batch-size", "4", "--eval-interval", "5",
                      "--eval-batches", "1", "--final-eval-batches", "2", "--interleave", "3", "--settle", "0",
                      "--no-progress", "--plot", str(tmp_path / "plot.png"))
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "s" / "results.json").read_text())
    runs = {r["model"]: r for r in out["runs"]}
    assert set(runs) == {"MoE", "dense"} and out["meta"]["interleave"] == 3
    for r in runs.values():
        assert r["elapsed"] >= 4.0 and r["interleave"] == 3
        # 3 steps a turn; the last turn may be shorter, or one step longer where the evaluation at its
        # third step spent the budget (one call would also take that step)
        assert 3 * (r["turns"] - 1) < r["steps"] <= 3 * r["turns"] + 1
        steps = [json.loads(line)["step"] for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, r["steps"] + 1))  # one run, continued turn after turn
        assert r["curve"][-1][2] >= 4.0 and "final_eval" in r
    assert min(r["turns"] for r in runs.values()) >= 2
    assert runs["MoE"]["elapsed"] + runs["dense"]["elapsed"] < wall  # the clocks never overlap
    assert "each pair in turns of 3 steps" in (tmp_path / "s" / "results.md").read_text()
    assert (tmp_path / "plot.png").is_file()


def test_studies_run_apart_merge_into_one_table_and_plot(tmp_path):
    """Seeds run on different days (each its own results.json) make one table and plot; a run found
    in two files is refused, so are training flags (they would be ignored), and an existing results.json is
    never overwritten."""
    import json

    def results(name, seed, moe_bpb, dense_bpb, dtype="bf16"):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        runs = [_run("MoE", seed, moe_bpb, 1000, [(500, 2.6), (1000, moe_bpb)], dtype=dtype),
                _run("dense", seed, dense_bpb, 1100, [(550, 2.6), (1100, dense_bpb)], dtype=dtype)]
        path.write_text(json.dumps({"meta": {"command": f"study {name}", "git_commit": "abc", "date": "2026-12-02T01:00"},
                                    "warnings": [], "runs": runs}))
        return str(path)

    a, b = results("a", 0, 2.10, 2.15), results("b", 1, 2.10, 2.12)
    proc = _study_cli("--from-results", a, b, "--out", str(tmp_path / "m"), "--plot", str(tmp_path / "m.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "m" / "results.json").read_text())["summary"]
    assert row["seeds"] == [0, 1] and row["margins"] == pytest.approx([0.05, 0.02]) and not row["target_met"]
    text = (tmp_path / "m" / "results.md").read_text()
    assert "`study a (commit abc, 2026-12-02)`" in text and "+0.0500 / +0.0200" in text in proc.stdout
    assert (tmp_path / "m.png").is_file()

    proc = _study_cli("--from-results", a, results("c", 0, 2.0, 2.1), "--plot", str(tmp_path / "c.png"))
    assert proc.returncode == 2 and "stdlib 10m seed 0 MoE (bf16) is in both" in proc.stderr
    # the same seed in another precision (another machine) is another row, not averaged with these
    proc = _study_cli("--from-results", a, b, results("g", 0, 2.3, 2.2, dtype="fp32"), "--out", str(tmp_path / "g2"),
                      "--plot", str(tmp_path / "g.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    bf16, fp32 = json.loads((tmp_path / "g2" / "results.json").read_text())["summary"]
    assert (bf16["dtype"], bf16["seeds"], fp32["dtype"], fp32["seeds"]) == ("bf16", [0, 1], "fp32", [0])
    assert fp32["margins"] == pytest.approx([-0.1]) and "| stdlib | 10m | fp32 | 1 |" in proc.stdout
    proc = _study_cli("--from-results", a, "--out", str(tmp_path / "m"), "--plot", str(tmp_path / "d.png"))
    assert proc.returncode == 2 and "already holds a results.json" in proc.stderr
    assert json.loads((tmp_path / "m" / "results.json").read_text())["summary"][0]["seeds"] == [0, 1]  # untouched
    proc = _study_cli("--from-results", a, "--seeds", "1", "--budget", "30m", "--plot", str(tmp_path / "f.png"))
    assert proc.returncode == 2 and "--budgets, --seeds would be ignored: drop them" in proc.stderr
    (tmp_path / "bad.json").write_text('{"runs": [{"seed": 0}]}')
    proc = _study_cli("--from-results", str(tmp_path / "bad.json"), "--plot", str(tmp_path / "e.png"))
    assert proc.returncode == 2 and "not a results.json of this study (KeyError" in proc.stderr
    assert not any((tmp_path / f"{x}.png").exists() for x in "cdef")
