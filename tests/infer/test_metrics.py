"""leanmoe/infer/metrics.py: the Prometheus metrics move as the engine serves requests; every
app has its own registry."""

import pytest

from leanmoe.infer import LLM, SamplingParams
from tests.infer.helpers import make_drafting_model, random_prompts

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from leanmoe.infer.metrics import EngineMetrics, _1_2_5_buckets  # noqa: E402


def samples(metrics: EngineMetrics) -> dict[str, float]:
    """name{labels but model_name} -> value, from the rendered text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            assert s.labels.pop("model_name") == metrics.model_name
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def test_metrics_follow_the_engine():
    llm = LLM(make_drafting_model(), block_size=4, num_blocks=14, max_model_len=52, speculative=True)
    metrics = EngineMetrics(llm, "m")
    before = samples(metrics)
    assert before["leanmoe:prompt_tokens_total"] == 0 and before["leanmoe:num_requests_running"] == 0
    assert before["leanmoe:time_to_first_token_seconds_count"] == 0
    prompts = random_prompts([5, 8, 9, 17, 31, 40], seed=1)
    for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)):
        metrics.observe(o)
    after = samples(metrics)
    n = len(prompts)
    assert after["leanmoe:prompt_tokens_total"] == sum(map(len, prompts))  # exactly, preemptions or not
    assert after["leanmoe:generation_tokens_total"] == 12 * n
    assert after["leanmoe:num_preemptions_total"] == llm.stats()["preemptions"] > 0
    assert after["leanmoe:spec_decode_num_draft_tokens_total"] > after["leanmoe:spec_decode_num_accepted_tokens_total"] > 0
    assert after["leanmoe:prefix_cache_queries_total"] >= sum(map(len, prompts))
    for h in ("time_to_first_token_seconds", "request_time_per_output_token_seconds", "e2e_request_latency_seconds",
              "request_prompt_tokens", "request_generation_tokens"):
        assert after[f"leanmoe:{h}_count"] == n, h
    assert after["leanmoe:request_prompt_tokens_sum"] == sum(map(len, prompts))
    assert after["leanmoe:request_success_total{finished_reason=length}"] == n
    assert after["leanmoe:kv_cache_usage_perc"] == 0.0 and after["leanmoe:num_requests_waiting"] == 0

    # mid-flight: running and waiting requests, blocks in use
    llm.add_request(prompts[5], SamplingParams(max_tokens=5))
    llm.add_request(prompts[4], SamplingParams(max_tokens=5))
    assert samples(metrics)["leanmoe:num_requests_waiting"] == 2
    llm.step()
    mid = samples(metrics)
    assert mid["leanmoe:num_requests_running"] >= 1 and mid["leanmoe:kv_cache_usage_perc"] > 0
    while llm.has_unfinished():
        llm.step()


def test_registries_are_per_app(model):
    a, b = EngineMetrics(LLM(model), "a"), EngineMetrics(LLM(model), "b")  # no "duplicated timeseries"
    a.llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    assert samples(a)["leanmoe:prompt_tokens_total"] == 3 and samples(b)["leanmoe:prompt_tokens_total"] == 0


def test_length_buckets():
    assert _1_2_5_buckets(256) == [1, 2, 5, 10, 20, 50, 100, 200]
