"""Shared fixtures: a micro model, a tokenizer trained on a few KB of text, a checkpoint folder."""

import pytest

from leanmoe import Transformer, save_pretrained
from tests.infer.helpers import VOCAB, make_model

TEXT = [
    "The engine keeps a paged cache of latent vectors. Each block holds sixty-four tokens. ",
    "Requests join and leave the running batch at every step; finished ones free their blocks. ",
    "Multi-head latent attention stores only the compressed latent and one rotary key per token. ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint(fib(10))\n",
    "오늘은 날씨가 맑아서 공원에 산책을 갔습니다. 저녁에는 친구와 김치찌개를 먹었어요. ",
    "我们去图书馆看书吧。机器学习需要大量的数据和计算资源。 ",
    "ship it 🚀🔥 done ✅ — café naïve résumé. ",
    "Once upon a time there was a small model that learned to count: one two three four five six. ",
] * 6


@pytest.fixture(scope="session")
def tokenizer():
    from leanmoe.data.tokenizer import train_tokenizer

    return train_tokenizer(TEXT, vocab_size=VOCAB, show_progress=False)


@pytest.fixture(scope="session")
def model() -> Transformer:
    return make_model()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(model, path)
    tokenizer.save(path)
    return path
