"""leanmoe/train/run_folder.py through the trainer: a run never touches a user's files, starts a
clean metrics file, and a failed run leaves no empty folder; file-system errors are one line."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from leanmoe.cli import main
from leanmoe.data.sources import DataError
from leanmoe.train import TrainConfig, Trainer, TrainingError
from leanmoe.train import run_checkpoint as ckpt_mod
from leanmoe.train.run_checkpoint import latest_checkpoint, list_checkpoints
from leanmoe.train.run_folder import RUN_MARKER


@pytest.fixture
def corpus(small_corpus) -> Path:
    return small_corpus


def _tc(tmp_path, corpus, out, **kw) -> TrainConfig:
    base = dict(config=str(tmp_path / "micro.json"), data=[str(corpus)], out=str(out), seq_len=32, batch_size=4,
                lr=3e-3, warmup_steps=1, eval_batches=1, sample_tokens=4, progress=False, max_steps=2,
                eval_interval=100)
    base.update(kw)
    return TrainConfig(**base)


def _argv(tmp_path, corpus, out, *extra) -> list[str]:
    return ["train", "--config", str(tmp_path / "micro.json"), "--data", str(corpus), "--out", str(out),
            "--seq-len", "32", "--batch-size", "4", "--quiet", *extra]


def test_a_folder_of_the_users_files_is_refused_and_left_alone(tmp_path, corpus):
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {"report.md": "my notes\n", "tokenizer.json": "{}", "metrics.jsonl": '{"step": 7, "mine": true}\n'}
    for name, text in files.items():
        (mine / name).write_text(text)
    with pytest.raises(TrainingError, match="not a leanmoe run folder"):
        Trainer(_tc(tmp_path, corpus, mine)).train()
    assert {p.name: p.read_text() for p in mine.iterdir()} == files  # nothing overwritten or appended to


def test_an_empty_folder_is_used_and_marked(tmp_path, corpus):
    out = tmp_path / "empty"
    out.mkdir()
    result = Trainer(_tc(tmp_path, corpus, out)).train()
    assert result.steps == 2 and (out / RUN_MARKER).is_file()


def test_a_run_folder_without_checkpoints_starts_clean_metrics(tmp_path, corpus, monkeypatch):
    out = tmp_path / "run"
    real = ckpt_mod.save_pretrained

    def no_space(model, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt_mod, "save_pretrained", no_space)  # the first attempt logs 2 steps, saves nothing
    with pytest.raises(OSError):
        Trainer(_tc(tmp_path, corpus, out)).train()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert latest_checkpoint(out) is None
    monkeypatch.setattr(ckpt_mod, "save_pretrained", real)
    Trainer(_tc(tmp_path, corpus, out, max_steps=3)).train()  # a fresh run in the same folder
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_failed_run_leaves_no_folder_behind(tmp_path, corpus):
    out = tmp_path / "new" / "run"
    with pytest.raises(DataError):
        Trainer(_tc(tmp_path, corpus, out, data=[str(tmp_path / "missing")])).train()
    assert not out.exists()


def test_out_under_a_regular_file_is_one_line(tmp_path, corpus, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(_argv(tmp_path, corpus, tmp_path / "afile" / "run", "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and "Traceback" not in err


def test_a_full_disk_is_one_line_and_keeps_the_checkpoints(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_argv(tmp_path, corpus, out, "--max-steps", "2", "--save-interval", "1")) == 0
    real, calls = ckpt_mod.save_pretrained, {"n": 0}

    def fills_up(model, path, *a, **k):
        calls["n"] += 1
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "model.safetensors"))

    monkeypatch.setattr(ckpt_mod, "save_pretrained", fills_up)
    capsys.readouterr()
    assert main(_argv(tmp_path, corpus, out, "--resume", "--max-steps", "4", "--save-interval", "1")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "intact" in err, err
    assert calls["n"] == 1 and [p.name for p in list_checkpoints(out)] == ["step-1", "step-2"]
    monkeypatch.setattr(ckpt_mod, "save_pretrained", real)
    assert main(_argv(tmp_path, corpus, out, "--resume", "--max-steps", "3")) == 0
