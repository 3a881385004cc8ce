"""leanmoe/train/commands.py: `leanmoe info | train | cost` refuse impossible values with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanmoe.cli import main


@pytest.fixture
def corpus(small_corpus) -> Path:
    return small_corpus


def _train(tmp_path, corpus, *extra) -> list[str]:
    return ["train", "--config", str(tmp_path / "micro.json"), "--data", str(corpus), "--out", str(tmp_path / "run"),
            "--seq-len", "32", "--batch-size", "4", "--quiet", *extra]


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.parametrize("extra,needle", [
    (["--max-steps", "0"], "--max-steps 0"), (["--max-steps", "-3"], "--max-steps -3"),
    (["--max-steps", "1", "--save-interval", "0"], "--save-interval 0"),
    (["--max-steps", "1", "--eval-interval", "0"], "--eval-interval 0"),
    (["--max-steps", "1", "--lr", "1e39"], "--lr"), (["--max-steps", "1", "--lr", "nan"], "--lr nan"),
    (["--max-steps", "1", "--lr=-1e-3"], "--lr"), (["--max-steps", "1", "--warmup-steps", "-1"], "--warmup-steps"),
    (["--max-steps", "1", "--keep-last", "0"], "--keep-last 0"), (["--time-budget", "0s"], "--time-budget"),
    (["--max-steps", "1", "--price-per-hour", "nan"], "--price-per-hour"),
])
def test_train_refuses_impossible_values(tmp_path, corpus, capsys, extra, needle):
    assert main(_train(tmp_path, corpus, *extra)) != 0
    _one_line_error(capsys, needle)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("n", ["0", "-1"])
def test_nproc_below_one_is_refused(tmp_path, corpus, capsys, n):
    assert main(_train(tmp_path, corpus, "--max-steps", "1", "--nproc", n)) == 2
    _one_line_error(capsys, f"--nproc {n}")


@pytest.mark.parametrize("price", ["-3", "nan", "inf"])
def test_cost_refuses_a_bad_price(capsys, price):
    assert main(["cost", "--preset", "tiny", "--tokens", "1B", "--gpu", "h100", "--mfu", "0.4",
                 "--price-per-hour", price]) == 2
    _one_line_error(capsys, "price_per_hour")


def test_info_forward_refuses_a_sequence_longer_than_the_model(capsys):
    assert main(["info", "--preset", "tiny", "--forward", "--seq-len", "100000"]) == 2
    _one_line_error(capsys, "--seq-len 100000", "max_position_embeddings")


def test_resume_applies_a_new_lr_and_batch_and_says_so_but_keeps_what_the_run_is(tmp_path, corpus, capsys):
    assert main(_train(tmp_path, corpus, "--max-steps", "2", "--lr", "3e-3")) == 0
    argv = _train(tmp_path, corpus, "--resume", "--max-steps", "3", "--lr", "1e-3", "--batch-size", "8")
    argv.remove("--quiet")
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "resume: --lr 0.003 -> 0.001 (applied)" in out and "resume: --batch-size 4 -> 8 (applied)" in out
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["tokens"] == 2 * 4 * 32 + 8 * 32
    assert last["lr"] <= 1e-3  # the new peak (the schedule's step-3 value under it)
    assert main(_train(tmp_path, corpus, "--resume", "--max-steps", "4", "--seed", "5")) == 1
    _one_line_error(capsys, "--seed 5 differs from the run's (0)")


def test_train_flags_default_to_the_train_configs_own_defaults():
    from leanmoe.cli import build_parser
    from leanmoe.train.config import TrainConfig

    args = build_parser().parse_args(["train"])
    assert args.schedule == TrainConfig().schedule == "wsd"  # measured: docs/benchmarks.md, session 14
    assert args.expert_lr_scale == TrainConfig().expert_lr_scale
