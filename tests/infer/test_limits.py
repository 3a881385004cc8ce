"""leanmoe/infer/limits.py: the checks that run before a request's size-proportional work, and the
server keeping every client (/health included) answered while a large request is handled."""

import json
import time

import httpx
import pytest

from leanmoe.infer.limits import (C_PARSE_MAX_VALUES, ServerLimits, check_choices, check_counts,
                                  longest_token_bytes, min_tokens, parse_json)
from leanmoe.infer.responses import APIError
from tests.infer.helpers import KEY, MODEL, ServerThread, assert_openai_error, health_latencies_while

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    assert e.value.status == 400
    return e.value


# ---------------------------------------------------------------------------- pure checks
@pytest.mark.parametrize("raw", [b'{"a": [1, {"b": "c"}]}',
                                 json.dumps({"a": [[1]] * (C_PARSE_MAX_VALUES + 1), "b": "\u00e9\U0001f680"}).encode()],
                         ids=["C parser", "Python scanner"])
def test_both_parsers_read_the_same_json(raw):
    assert parse_json(raw, 2**20) == json.loads(raw)


def test_parse_json_refuses_what_python_parses_but_no_tokenizer_can_carry():
    assert "surrogate" in error_of(parse_json, b'{"prompt": "a\\ud800"}', 100).message
    assert error_of(parse_json, b'{"x": {"\\udfff": 1}}', 100).param == "x"  # in a key, nested
    assert parse_json(b'{"p": "\\ud83d\\ude80 \\\\ud800"}', 100) == {"p": "\U0001f680 \\ud800"}  # a pair; a literal
    for raw in (b"[" * 100_000, b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        assert "deeply" in error_of(parse_json, raw, 2**20).message
    assert "valid JSON" in error_of(parse_json, b'{"seed": 1' + b"0" * 5000 + b"}", 100).message
    assert "valid JSON" in error_of(parse_json, b'{"t": Infinity}', 100).message
    assert "UTF-8" in error_of(parse_json, b'{"t": "\xff"}', 100).message
    assert "object" in error_of(parse_json, b"[1]", 100).message


def test_too_many_containers_stop_the_python_scanner():
    raw = json.dumps({"user": [[1]] * 10**5}).encode()
    t0 = time.perf_counter()
    assert "more than 1000 JSON arrays" in error_of(parse_json, raw, 1000).message
    assert time.perf_counter() - t0 < 0.5  # it stopped at the cap, it did not read 10**5 arrays
    assert "more than 3 JSON arrays" in error_of(parse_json, b'{"a": [[], [], []]}', 3).message  # a small body too
    assert parse_json(b'{"a": "[[[[", "b": [[]]}', 3) == {"a": "[[[[", "b": [[]]}  # brackets in strings do not count


def test_counts_are_checked_before_validation():
    limits = ServerLimits(max_choices=4)
    check_counts({"prompt": ["a"] * 4, "messages": [{}] * 3}, limits, max_model_len=8, tokens_per_message=2)
    assert error_of(check_counts, {"prompt": ["a"] * 5}, limits, 8, 2).param == "prompt"
    assert error_of(check_counts, {"prompt": [1] * 8}, limits, 8, 2).code == "context_length_exceeded"
    assert error_of(check_counts, {"messages": [{}] * 4}, limits, 8, 2).code == "context_length_exceeded"
    check_counts({"messages": [{}] * 4}, limits, 8, tokens_per_message=0)  # an unknown template: no bound
    check_choices(2, 2, limits)
    e = error_of(check_choices, 3, 2, limits)
    assert e.param == "n" and "6 choices" in e.message and "at most 4" in e.message


def test_min_tokens_is_a_lower_bound(tokenizer):
    longest = longest_token_bytes(tokenizer)
    assert longest >= len("<|assistant|>")  # special-token strings count: each is one token
    texts = ["a" * 999, "word " * 300, "<|user|>" * 50, "오늘은 날씨가 맑아서 " * 40, "🚀" * 100, "ship it 🚀🔥 done ✅ — café"]
    for text in texts:
        assert min_tokens(len(text), longest) <= len(tokenizer.encode(text)), text[:20]
    assert min_tokens(10**6, None) == 0


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_choices"):
        ServerLimits(max_choices=0)
    with pytest.raises(ValueError, match="workers"):
        ServerLimits(workers=True)


# ---------------------------------------------------------------------------- over HTTP
def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return None


def test_a_huge_prompt_neither_blocks_other_clients_nor_keeps_memory(server):
    body = json.dumps({"model": MODEL, "prompt": "a" * 7_900_000}).encode()  # under the 8 MiB body cap
    rss = rss_bytes()
    latencies, r = health_latencies_while(
        server.url, lambda: httpx.post(server.url + "/v1/completions", content=body, headers=JSON, timeout=120))
    assert assert_openai_error(r, 400, "prompt")["code"] == "context_length_exceeded"
    assert max(latencies) < 0.2, f"/health took {max(latencies):.3f} s while the prompt was handled"
    if rss is not None:
        grown = rss_bytes() - rss
        assert grown < 200 * 2**20, f"the process grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("body", [{"prompt": [[1, 2]] * 400_000}, {"prompt": "x", "user": [[[1]]] * 300_000},
                                  {"messages": [{"role": "user", "content": "hi"}] * 100_000}],
                         ids=["prompt lists", "nested user", "messages"])
def test_bodies_of_many_small_values_do_not_block_other_clients(server, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    raw = json.dumps({"model": MODEL, **body}).encode()
    latencies, r = health_latencies_while(
        server.url, lambda: httpx.post(server.url + path, content=raw, headers=JSON, timeout=120))
    assert_openai_error(r, 400)
    assert max(latencies) < 0.2, f"/health took {max(latencies):.3f} s while the request was handled"


def test_choices_per_request_are_capped(server):
    body = {"model": MODEL, "prompt": ["hi"] * 5000, "n": 16, "max_tokens": 1}
    latencies, r = health_latencies_while(
        server.url, lambda: httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=120))
    assert "256" in assert_openai_error(r, 400, "prompt")["message"]
    assert max(latencies) < 0.2, f"/health took {max(latencies):.3f} s while the request was handled"
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": MODEL, "prompt": ["hi"] * 17, "n": 16, "max_tokens": 1})
    assert "256" in assert_openai_error(r, 400, "n")["message"]


class SlowTokenizer:
    """The test tokenizer, `delay` seconds slower per encode; sleeping releases the GIL, as the
    Rust `tokenizers` does while it encodes."""

    def __init__(self, tok, delay: float):
        self._tok, self.delay = tok, delay

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text):
        time.sleep(self.delay)
        return self._tok.encode(text)

    def encode_chat(self, messages, add_generation_prompt=True):
        time.sleep(self.delay)
        return self._tok.encode_chat(messages, add_generation_prompt)


def test_tokenising_runs_off_the_event_loop(checkpoint, tokenizer):
    from leanmoe.infer import LLM
    from leanmoe.infer.async_engine import AsyncEngine
    from leanmoe.infer.server import create_app

    llm = LLM(checkpoint, tokenizer=SlowTokenizer(tokenizer, 0.5), max_model_len=256, block_size=8)
    app = create_app(AsyncEngine(llm), MODEL, limits=ServerLimits(inline_bytes=0))  # every body is "large"
    requests = [("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2}),
                ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 2})]
    with ServerThread(app) as srv:
        for path, body in requests:
            latencies, r = health_latencies_while(srv.url, lambda: httpx.post(srv.url + path, json=body, timeout=30))
            assert r.status_code == 200, r.text
            assert max(latencies) < 0.2, f"/health took {max(latencies):.3f} s while {path} was tokenised"
