"""leanmoe/infer/server.py over loopback with the official openai client: completions, chat,
streaming, auth, bad requests (odd JSON, wrong methods), disconnects, and 32 concurrent streams.
The `server` fixture is in conftest.py."""

import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from leanmoe.infer import LLM, SamplingParams  # noqa: E402
from leanmoe.infer.server import ServerLimits  # noqa: E402
from tests.infer.helpers import KEY, MODEL, assert_openai_error  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def expected(checkpoint):
    """Reference outputs from a separate engine over the same checkpoint."""
    llm = LLM(checkpoint, max_model_len=256, block_size=8)

    def run(prompt, max_tokens, chat=False):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens)
        if chat:
            text = llm.tokenizer.apply_chat_template(prompt)
            sp = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=llm.chat_stop_token_ids())
            prompt = llm.tokenizer.encode(text)
        return llm.generate(prompt, sp)[0]

    return run


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_for_free_blocks(llm, timeout=10.0):
    bm = llm.block_manager
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bm.num_free_blocks == bm.num_blocks and not llm.has_unfinished():
            return True
        time.sleep(0.02)
    return False


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_matches_the_engine(client, expected):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    ref = expected("Once upon a time", 12)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    many = client.completions.create(model=MODEL, prompt=["Once upon a time", "hi"], max_tokens=4,
                                     temperature=0, n=2)
    assert len(many.choices) == 4 and [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == expected("Once upon a time", 4).text


def test_chat_and_streaming_match(client, expected):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}]
    ref = expected(messages, 16, chat=True)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert text == expected("Once upon a time", 12).text


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_auth_failures(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


BAD_BODIES = [
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "five"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ({"model": MODEL, "prompt": 42}, "prompt"),
    ({"model": MODEL, "prompt": []}, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 99999]}, "prompt"),
    ({"model": MODEL, "prompt": "word " * 400}, "prompt"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "logprobs": True}, "logprobs"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "seed": 2**64}, "seed"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES, ids=[p for _, p in BAD_BODIES])
def test_bad_completion_requests_are_400(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_other_bad_requests(server, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for raw in (b'{"model": "micro", "prompt": ', b"[1, 2]", b"\xff\xfe", b""):
        r = httpx.post(server.url + "/v1/completions", content=raw, headers=headers, timeout=30)
        assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    # an oversized body is refused also when it is chunked (no Content-Length to check up front)
    MAX_BODY_BYTES = ServerLimits().max_body_bytes

    def chunks():
        yield b'{"model": "micro", "prompt": "'
        for _ in range(MAX_BODY_BYTES // 2**16 + 2):
            yield b"a" * 2**16

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(server.url + "/v1/nope", headers=headers)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}  # still serving


def test_disconnect_mid_stream_frees_blocks(server):
    llm = server.llm
    aborted = llm.stats()["aborted"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 2:
                break  # leave after the first events: the connection closes
    assert wait_for_free_blocks(llm)
    assert llm.stats()["aborted"] == aborted + 1
    # a client that gives up on a non-streaming request
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "n": 4},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    assert wait_for_free_blocks(llm)
    assert llm.stats()["aborted"] > aborted + 1


def test_32_concurrent_streams_complete_correctly(server, expected):
    prompts = [f"Request {i}: once upon a time" for i in range(32)]
    refs = [expected(p, 10).text for p in prompts]

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == refs
    assert all(f in ("stop", "length") for _, f in results)
    assert wait_for_free_blocks(server.llm)


def local_port(r: httpx.Response) -> int:
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


ODD_BODIES = [  # JSON that parses in Python but is not text a tokenizer (or a response) can carry
    ("/v1/completions", '{"model": "micro", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"model": "micro", "prompt": ["fine", "a\\udfffb"]}', "prompt"),
    ("/v1/chat/completions", '{"model": "micro", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/v1/chat/completions", '{"model": "micro", "messages": [{"role": "user", "content": [{"type": "text", '
                             '"text": "\\udfff"}]}]}', "messages"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "x"}', "model"),
    ("/v1/completions", '{"model": "micro", "prompt": "x", "stop": "\\udfff"}', "stop"),
    ("/v1/completions", '{"model": "micro", "prompt": "x", "stop": ["ok", "\\ud800"]}', "stop"),
    ("/v1/completions", '{"model": "micro", "prompt": "x", "\\ud800": 1}', None),
    ("/v1/completions", '{"model": "micro", "prompt": "x", "user": ' + "[" * 1000 + "]" * 1000 + "}", None),
    ("/v1/completions", '{"model": "micro", "prompt": "x", "user": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
     None),
    ("/v1/completions", '{"model": "micro", "prompt": "x", "seed": 1' + "0" * 5000 + "}", None),
    ("/v1/completions", '{"model": "micro", "prompt": "x", "temperature": NaN}', None),
]


@pytest.mark.parametrize("path,raw,param", ODD_BODIES, ids=range(len(ODD_BODIES)))
def test_odd_json_is_400_and_the_connection_stays_usable(server, path, raw, param):
    headers = {**AUTH, "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30, limits=httpx.Limits(max_connections=1)) as c:
        bad = c.post(path, content=raw.encode())
        assert_openai_error(bad, 400, param)
        good = c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert good.status_code == 200, good.text
        assert local_port(good) == local_port(bad)  # the same keep-alive connection


def test_405_names_the_allowed_methods(server):
    r = httpx.get(server.url + "/v1/completions", headers=AUTH)
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    r = httpx.post(server.url + "/health")
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "GET"


def test_serving_threads_leave_a_core_to_the_event_loop(monkeypatch):
    from leanmoe.infer.server import serving_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [serving_threads(cores=c, own_process=False) for c in (1, 2, 16)] == [1, 1, 15]
    assert [serving_threads(cores=c) for c in (1, 2, 16)] == [1, 2, 16]  # an engine process: every core
    assert serving_threads(3, cores=2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert serving_threads(cores=2) == 2
    with pytest.raises(ValueError, match="--threads"):
        serving_threads(0)
