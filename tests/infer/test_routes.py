"""leanmoe/infer/routes.py over loopback: /metrics moves as requests are served, /openapi.json
documents the request bodies the server accepts, /docs serves, vLLM's tokenizer routes round-trip,
and all of them need the API key (only /health does not). The `server` fixture is in conftest.py."""

import httpx
import pytest

from tests.infer.helpers import KEY, MODEL, assert_openai_error

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}


def scrape(url: str) -> dict[str, float]:
    r = httpx.get(url + "/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    return {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
            if s.labels.get("model_name") == MODEL and "le" not in s.labels}


def test_metrics_move_as_requests_are_served(server):
    before = scrape(server.url)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": MODEL, "prompt": prompts, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    after = scrape(server.url)
    assert after["leanmoe:prompt_tokens_total"] - before["leanmoe:prompt_tokens_total"] == 8  # exactly
    assert after["leanmoe:generation_tokens_total"] - before["leanmoe:generation_tokens_total"] == 8
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_time_per_output_token_seconds"):
        assert after[f"leanmoe:{h}_count"] - before[f"leanmoe:{h}_count"] == 2, h
    assert after["leanmoe:request_success_total"] - before.get("leanmoe:request_success_total", 0) == 2
    assert after["leanmoe:prefix_cache_queries_total"] > before["leanmoe:prefix_cache_queries_total"]
    assert after["leanmoe:num_requests_running"] == 0 and after["leanmoe:kv_cache_usage_perc"] == 0
    for name in ("num_requests_waiting", "prefix_cache_hits_total", "num_preemptions_total",
                 "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total"):
        assert f"leanmoe:{name}" in after, name


def test_every_route_but_health_needs_the_key(server):
    for method, path in (("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/tokenize"),
                         ("POST", "/detokenize"), ("GET", "/tokenizer_info"), ("GET", "/v1/models")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert_openai_error(httpx.request(method, server.url + path, headers=headers, json={}), 401)
    assert httpx.get(server.url + "/health").status_code == 200
    docs = httpx.get(server.url + "/docs", headers=AUTH)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_openapi_documents_the_request_bodies(server):
    from leanmoe.infer.protocol import ChatCompletionRequest, CompletionRequest

    doc = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
        schema = schemas[model.__name__]
        assert set(schema["properties"]) == set(model.model_fields)  # exactly the fields the server reads
        assert set(schema["required"]) == {n for n, f in model.model_fields.items() if f.is_required()}
    props = schemas["CompletionRequest"]["properties"]
    assert {"echo", "logprobs", "logit_bias", "presence_penalty", "frequency_penalty"} <= set(props)
    assert props["logprobs"]["anyOf"][0]["maximum"] == 20 and props["max_tokens"]["anyOf"][0]["minimum"] == 0
    assert {"logprobs", "top_logprobs"} <= set(schemas["ChatCompletionRequest"]["properties"])
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["items"] == {
        "$ref": "#/components/schemas/ChatMessage"} and "ChatMessage" in schemas  # every $ref resolves
    assert {"/metrics", "/health", "/v1/models", "/tokenize"} <= set(doc["paths"])
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/health"]["get"]["security"] == []


def test_tokenizer_routes_round_trip(server):
    tok = server.llm.tokenizer
    text = "def fib(n): café 🚀"
    r = httpx.post(server.url + "/tokenize", headers=AUTH, json={"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(text) and r.json()["max_model_len"] == 256
    r = httpx.post(server.url + "/detokenize", headers=AUTH, json={"tokens": tok.encode(text)})
    assert r.json() == {"prompt": text}
    info = httpx.get(server.url + "/tokenizer_info", headers=AUTH).json()
    assert tok.encode(info["eos_token"]) == [tok.eos_id] and tok.encode(info["bos_token"]) == [tok.bos_id]
    assert "chat_template" in info
    assert_openai_error(httpx.post(server.url + "/detokenize", headers=AUTH, json={"tokens": [1, 10**6]}), 400,
                        "tokens")
    assert_openai_error(httpx.post(server.url + "/tokenize", headers=AUTH, json={"prompt": 5}), 400, "prompt")
