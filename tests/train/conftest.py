"""Fixtures shared by the trainer's command and run-folder tests."""

import json
from pathlib import Path

import pytest

from tests.util import MICRO_TRAIN, write_corpus


@pytest.fixture
def small_corpus(tmp_path, monkeypatch) -> Path:
    """A small text corpus in tmp_path/corpus, tmp_path/micro.json (the micro model) and a shard
    cache of the test's own."""
    monkeypatch.setenv("LEANMOE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    write_corpus(folder, n_docs=12, lines=30)
    (tmp_path / "micro.json").write_text(json.dumps(MICRO_TRAIN))
    return folder
