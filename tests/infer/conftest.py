"""Shared fixtures: a micro model, a tokenizer trained on a few KB of text, a checkpoint folder,
and a server over it (one per test module that asks for it)."""

import pytest

from leanmoe import Transformer, save_pretrained
from tests.infer.helpers import KEY, MODEL, VOCAB, ServerThread, make_model

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


@pytest.fixture(scope="session", autouse=True)
def _unfreeze_gc_at_exit():
    """ServerThread freezes the heap as `serve` does; thaw it before the interpreter exits, so
    shutdown frees those objects (Triton's extension prints warnings for what it does not free)."""
    yield
    import gc

    gc.unfreeze()


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


@pytest.fixture(scope="module")
def server(checkpoint):
    """The checkpoint served on a loopback port as MODEL, with api key KEY; `.llm` is its engine."""
    pytest.importorskip("fastapi")
    from leanmoe.infer import LLM
    from leanmoe.infer.async_engine import AsyncEngine
    from leanmoe.infer.server import create_app

    llm = LLM(checkpoint, max_model_len=256, block_size=8)
    app = create_app(AsyncEngine(llm), MODEL, api_key=KEY)
    with ServerThread(app) as srv:
        srv.llm = llm
        yield srv
