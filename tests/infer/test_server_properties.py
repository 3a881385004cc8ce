"""Property-based tests of leanmoe/infer/server.py's HTTP surface: whatever a client sends to any
route (well-formed requests, wrong types, huge or odd numbers, any Unicode including lone
surrogates, nested junk, non-JSON), the answer is below 500, a non-2xx answer carries OpenAI's
error body, and the server still answers /health.

Valid requests keep max_tokens small (the default completion is 16 tokens) so that sampling stays
fast; invalid values of it are generated as for every other field."""

import json
from urllib.parse import quote

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.infer.helpers import KEY, MODEL, assert_openai_error  # noqa: E402

SETTINGS = settings(max_examples=100, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ---------------------------------------------------------------------------- strategies
odd_char = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("<|>\\\"\x00\n"))
text = st.one_of(st.text(max_size=12), st.lists(odd_char, max_size=12).map("".join),
                 st.sampled_from(["", MODEL, "<|user|>", "<|end|>", "\ud800", "a\udfffb", "\U0001f680", " " * 50]))
numbers = st.one_of(st.integers(), st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 10**30, -(10**30)]),
                    st.floats(), st.sampled_from([1e308, -1e308, 5e-324, float("nan"), float("inf")]))
json_values = st.recursive(st.none() | st.booleans() | numbers | text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                           max_leaves=12)
deep = st.integers(1, 3000).map(lambda d: "[" * d + "]" * d)  # spliced in as raw JSON


plain_text = st.text(max_size=12)  # no surrogates
clean_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                          | plain_text, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain_text, inner,
                                                                                                    max_size=3),
                          max_leaves=6)
token_ids = st.lists(st.integers(-2, 330), max_size=8)
small_counts = st.one_of(st.integers(), json_values)

# field: (valid values, anything else); the valid ones keep sampling short
SAMPLING = {
    "max_tokens": (st.integers(1, 4), small_counts),
    "temperature": (st.floats(0, 2), json_values),
    "top_p": (st.floats(0, 1, exclude_min=True), json_values),
    "top_k": (st.integers(-1, 400), json_values),
    "n": (st.integers(1, 3), small_counts),
    "seed": (st.integers(-(2**63), 2**63 - 17), json_values),
    "stream": (st.booleans(), json_values),
    "stop": (st.one_of(plain_text.filter(bool), st.lists(plain_text.filter(bool), max_size=4)),
             st.one_of(text, st.lists(text, max_size=6), json_values)),
    "user": (plain_text, json_values),  # a string; anything else is a 400
    "presence_penalty": (st.just(0), json_values),
    "frequency_penalty": (st.just(0.0), json_values),
    "logit_bias": (st.just({}), json_values),
    "ignore_eos": (st.booleans(), json_values),
}
COMPLETION = {
    "prompt": (st.one_of(plain_text, st.lists(plain_text, min_size=1, max_size=3), st.lists(st.integers(7, 300),
                                                                                             min_size=1, max_size=8)),
               st.one_of(text, st.lists(text, max_size=3), token_ids, st.lists(token_ids, max_size=3), json_values)),
    "echo": (st.just(False), json_values), "logprobs": (st.none(), json_values), "best_of": (st.just(1), json_values),
    "suffix": (st.none(), json_values),
}
part = st.fixed_dictionaries({"type": st.just("text"), "text": plain_text})
MESSAGE = {
    "role": (st.sampled_from(["system", "developer", "user", "assistant"]), json_values),
    "content": (st.one_of(plain_text, st.none(), st.lists(part, max_size=3)),
                st.one_of(text, st.lists(st.fixed_dictionaries({"type": text, "text": text}), max_size=3),
                          json_values)),
    "name": (plain_text, json_values),
}


def bodies(required: dict, optional: dict):
    """JSON objects with every field valid (some of the optional ones left out), or such an object
    with one or two fields set to anything else: the junk reaches the code behind a valid rest."""
    valid = st.builds(merged, st.dictionaries(plain_text, clean_json, max_size=2),  # vendor extras are ignored
                      st.fixed_dictionaries({k: v for k, (v, _) in required.items()},
                                            optional={k: v for k, (v, _) in optional.items()}))
    fields = {**required, **optional}
    junk = st.fixed_dictionaries({k: bad for k, (_, bad) in fields.items()})
    keys = st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2)
    mixed = st.builds(lambda body, junk, keys, extra: {**extra, **body, **{k: junk[k] for k in keys}},
                      valid, junk, keys, st.dictionaries(text, json_values, max_size=1))
    return st.one_of(valid, mixed)


def merged(extra: dict, body: dict) -> dict:
    return {**extra, **body}


model = (st.just(MODEL), text)
completion_bodies = bodies({"model": model, "prompt": COMPLETION["prompt"]},
                           {**SAMPLING, **{k: v for k, v in COMPLETION.items() if k != "prompt"}})
message = bodies({k: MESSAGE[k] for k in ("role", "content")}, {"name": MESSAGE["name"]})
chat_bodies = bodies({"model": model, "messages": (st.lists(message, min_size=1, max_size=4), json_values),
                      "max_tokens": SAMPLING["max_tokens"]},  # no default: it would be the whole context
                     {**{k: v for k, v in SAMPLING.items() if k != "max_tokens"},
                      "max_completion_tokens": (st.integers(1, 4), small_counts),
                      "stream_options": (st.none(), st.one_of(  # valid with "stream": true only
                          st.fixed_dictionaries({"include_usage": st.booleans()}), json_values)),
                      "logprobs": (st.just(False), json_values), "top_logprobs": (st.none(), json_values)})


def raw_bodies(objects):
    """Bytes on the wire: an object from `objects`, any JSON value, one field nested deep, or not JSON."""
    return st.one_of(
        objects.map(lambda b: json.dumps(b).encode()),  # ensure_ascii: lone surrogates go out as \ud800 escapes
        objects.map(lambda b: json.dumps(b).encode()),
        objects.map(lambda b: json.dumps(b).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.tuples(objects, deep).map(lambda bd: json.dumps(bd[0]).encode()[:-1] + b', "user": ' + bd[1].encode()
                                     + b"}" if bd[0] else bd[1].encode()),
        st.binary(max_size=40))


auth = st.sampled_from([{"Authorization": f"Bearer {KEY}"}] * 8 + [{"Authorization": "Bearer nope"}, {}])


# ---------------------------------------------------------------------------- the property
@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def check(http: httpx.Client, r: httpx.Response) -> None:
    hypothesis.event(f"status {r.status_code}")  # pytest --hypothesis-show-statistics: the mix of answers
    assert r.status_code < 500, r.text[:500]
    if not 200 <= r.status_code < 300:
        assert_openai_error(r, r.status_code)
    health = http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


@SETTINGS
@given(body=raw_bodies(completion_bodies), headers=auth)
def test_completions_never_fail_the_server(http, body, headers):
    check(http, http.post("/v1/completions", content=body, headers={**headers, "Content-Type": "application/json"}))


@SETTINGS
@given(body=raw_bodies(chat_bodies), headers=auth)
def test_chat_completions_never_fail_the_server(http, body, headers):
    check(http, http.post("/v1/chat/completions", content=body,
                          headers={**headers, "Content-Type": "application/json"}))


get_routes = st.one_of(st.sampled_from(["/health", "/v1/models", f"/v1/models/{MODEL}"]),
                       text.map(lambda name: "/v1/models/" + quote(name.encode("utf-8", "surrogatepass"), safe="")))


@settings(SETTINGS, max_examples=60)
@given(path=get_routes, method=st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       body=st.one_of(st.just(b""), raw_bodies(completion_bodies)), headers=auth)
def test_models_and_health_never_fail_the_server(http, path, method, body, headers):
    check(http, http.request(method, path, content=body, headers=headers))
