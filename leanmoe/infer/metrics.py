"""Prometheus metrics of a served engine (`GET /metrics`, the text exposition format).

    metrics = EngineMetrics(llm, model_name="tiny")   # its own CollectorRegistry
    metrics.observe(output)                            # each finished RequestOutput
    body, content_type = metrics.render()

Names are vLLM's with `leanmoe:` for `vllm:`, so a vLLM dashboard ports by renaming the prefix;
every metric carries vLLM's `model_name` label. What each one mirrors:

    leanmoe:num_requests_running                 gauge      vllm:num_requests_running
    leanmoe:num_requests_waiting                 gauge      vllm:num_requests_waiting
    leanmoe:kv_cache_usage_perc                  gauge      vllm:kv_cache_usage_perc (blocks held, 0..1)
    leanmoe:prefix_cache_queries_total           counter    vllm:prefix_cache_queries (prompt tokens looked up)
    leanmoe:prefix_cache_hits_total              counter    vllm:prefix_cache_hits (of which found)
    leanmoe:num_preemptions_total                counter    vllm:num_preemptions
    leanmoe:prompt_tokens_total                  counter    vllm:prompt_tokens
    leanmoe:generation_tokens_total              counter    vllm:generation_tokens
    leanmoe:spec_decode_num_drafts_total         counter    vllm:spec_decode_num_drafts
    leanmoe:spec_decode_num_draft_tokens_total   counter    vllm:spec_decode_num_draft_tokens
    leanmoe:spec_decode_num_accepted_tokens_total counter   vllm:spec_decode_num_accepted_tokens
    leanmoe:request_success_total                counter    vllm:request_success (label finished_reason)
    leanmoe:time_to_first_token_seconds          histogram  vllm:time_to_first_token_seconds
    leanmoe:request_time_per_output_token_seconds histogram vllm:request_time_per_output_token_seconds
    leanmoe:e2e_request_latency_seconds          histogram  vllm:e2e_request_latency_seconds
    leanmoe:request_prompt_tokens                histogram  vllm:request_prompt_tokens
    leanmoe:request_generation_tokens            histogram  vllm:request_generation_tokens

Gauges and token counters are read from the engine's own counters when scraped, so the engine
thread does no metrics work per step; the request histograms are observed once per finished
request (from its RequestOutput.metrics), on whichever thread relays it. A request's times run
from its arrival (tokenised, before queueing), so they include time spent waiting.

Needs `prometheus_client` (in the `serve` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leanmoe.infer.engine import LLM, RequestOutput

__all__ = ["COUNTER_KEYS", "ENGINE_FAMILIES", "EngineMetrics", "engine_counters"]

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


def _1_2_5_buckets(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


class EngineMetrics:
    """The metrics of one engine (`llm`), in a registry of their own: several apps in one process
    do not clash."""

    def __init__(self, llm: LLM, model_name: str, counters: Callable[[], dict[str, float]] | None = None):
        """counters: where the engine's counters are read when scraped (default
        `engine_counters(llm)`; an engine in another process passes its last report)."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.llm = llm
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(counters or (lambda: engine_counters(llm)), model_name))
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = histogram("leanmoe:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.tpot = histogram("leanmoe:request_time_per_output_token_seconds",
                              "Histogram of a request's mean time per output token (after the first) in seconds.",
                              TPOT_BUCKETS)
        self.latency = histogram("leanmoe:e2e_request_latency_seconds",
                                 "Histogram of end-to-end request latency in seconds.", LATENCY_BUCKETS)
        lengths = _1_2_5_buckets(llm.max_model_len)
        self.prompt_len = histogram("leanmoe:request_prompt_tokens", "Number of prompt tokens per request.", lengths)
        self.output_len = histogram("leanmoe:request_generation_tokens", "Number of generated tokens per request.",
                                    lengths)
        self.success = Counter("leanmoe:request_success", "Count of finished requests, by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)

    def observe(self, out: RequestOutput) -> None:
        """Record a finished request (outputs that are not finished are ignored)."""
        if not out.finished:
            return
        m = out.metrics
        if "time_to_first_token" in m:
            self.ttft.observe(m["time_to_first_token"])
        if "time_per_output_token" in m:
            self.tpot.observe(m["time_per_output_token"])
        if "latency" in m:
            self.latency.observe(m["latency"])
        self.prompt_len.observe(len(out.prompt_token_ids))
        self.output_len.observe(len(out.token_ids))
        self.success.labels(self.model_name, out.finish_reason or "stop").inc()

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# what _EngineCollector reports: (kind, name, help text, key in the engine counters)
ENGINE_FAMILIES = (
    ("gauge", "leanmoe:num_requests_running", "Number of requests in the running batch.", "running"),
    ("gauge", "leanmoe:num_requests_waiting", "Number of requests waiting to be scheduled.", "waiting"),
    ("gauge", "leanmoe:kv_cache_usage_perc", "KV-cache usage: share of cache blocks held (1 = all).", "cache_usage"),
    ("counter", "leanmoe:prefix_cache_queries", "Prefix cache queries, in prompt tokens looked up.", "prefix_queries"),
    ("counter", "leanmoe:prefix_cache_hits", "Prefix cache hits, in prompt tokens found.", "prefix_hits"),
    ("counter", "leanmoe:num_preemptions", "Cumulative number of preemptions.", "preemptions"),
    ("counter", "leanmoe:prompt_tokens", "Number of prompt tokens processed.", "prompt_tokens"),
    ("counter", "leanmoe:generation_tokens", "Number of generation tokens processed.", "generation_tokens"),
    # MTP drafts one token at a time: drafts and draft tokens are the same count
    ("counter", "leanmoe:spec_decode_num_drafts", "Number of speculative drafts verified.", "draft_tokens"),
    ("counter", "leanmoe:spec_decode_num_draft_tokens", "Number of draft tokens verified.", "draft_tokens"),
    ("counter", "leanmoe:spec_decode_num_accepted_tokens", "Number of draft tokens accepted.", "accepted_tokens"),
)
COUNTER_KEYS = tuple(dict.fromkeys(key for *_, key in ENGINE_FAMILIES))  # the keys engine_counters returns


def engine_counters(llm: LLM) -> dict[str, float]:
    """The engine state /metrics reports (COUNTER_KEYS), read from `llm`'s scheduler, block
    manager and runner. The engine thread changes them meanwhile; each is one int read, atomic
    under the GIL, so a scrape never blocks a step."""
    sched, bm, runner = llm.scheduler, llm.block_manager, llm.runner
    return {"running": len(sched.running), "waiting": len(sched.waiting),
            "cache_usage": 1.0 - bm.num_free_blocks / bm.num_blocks,
            "prefix_queries": bm.prefix_query_tokens, "prefix_hits": bm.prefix_hit_tokens,
            "preemptions": sched.num_preemptions, "prompt_tokens": llm.num_prompt_tokens,
            "generation_tokens": llm.num_generated_tokens, "draft_tokens": runner.num_draft_tokens,
            "accepted_tokens": runner.num_accepted_tokens}


class _EngineCollector:
    """Gauges and counters read from the engine (`counters()`) when scraped."""

    def __init__(self, counters: Callable[[], dict[str, float]], model_name: str):
        self.counters = counters
        self.labels = [model_name]

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.counters()
        for kind, name, doc, key in ENGINE_FAMILIES:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=["model_name"])
            family.add_metric(self.labels, c[key])
            yield family
