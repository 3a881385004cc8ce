"""The expert-parallel traffic model (leanmoe/train/scale_model.py) against DeepEP's published
H800 figures and against closed-form routing statistics."""

from __future__ import annotations

import math

import pytest

from leanmoe.config import ModelConfig
from leanmoe.train.scale_model import (DEEPEP_H800, Cluster, deepep_check, main, routing_stats,
                                          step_estimate)


def test_reproduces_deepep_h800_within_12_percent():
    rows = deepep_check(Cluster(gpus_per_node=8, nvlink_gbps=160, rdma_gbps=50, efficiency=0.85))
    assert [r["ep"] for r in rows] == [ep for ep, *_ in DEEPEP_H800]
    for r in rows:
        for what in ("dispatch", "combine"):
            got, want = r[what]["predicted_gbps"], r[what]["published_gbps"]
            assert got == pytest.approx(want, rel=0.12), (r["ep"], what, got, want)
    assert rows[0]["dispatch"]["bound"] == "NVLink" and rows[-1]["dispatch"]["bound"] == "RDMA"


def test_routing_matches_closed_form_for_plain_top_k():
    # K of E experts uniformly: P(a rank of L experts is hit) = 1 - C(E - L, K) / C(E, K)
    e, k, ep = 64, 6, 8
    cfg = ModelConfig(hidden_size=e, n_routed_experts=e, num_experts_per_tok=k, n_group=1, topk_group=1)
    st = routing_stats(cfg, ep, gpus_per_node=4, tokens=8192)
    p_hit = 1 - math.comb(e - e // ep, k) / math.comb(e, k)
    assert st.ranks == pytest.approx(ep * p_hit, rel=0.02)
    assert st.local_ranks + st.remote_ranks + p_hit == pytest.approx(st.ranks, rel=0.02)
    p_node = 1 - math.comb(e - 4 * (e // ep), k) / math.comb(e, k)  # 2 nodes of 4 ranks
    assert st.nodes == pytest.approx(2 * p_node, rel=0.02)


def test_node_limited_routing_and_the_price_of_a_flat_all_to_all():
    v3 = ModelConfig.from_preset("deepseek-v3")
    st = routing_stats(v3, 64, gpus_per_node=8)
    assert st.nodes <= 4.0 + 1e-6  # V3 sends a token to at most 4 of 8 nodes (groups = nodes)
    est = step_estimate(v3, 64, 4096, Cluster(), stats=st)
    # without NVLink forwarding, every remote destination rank costs network bytes
    assert est["leanmoe"]["rdma_bytes"] > 1.5 * est["deepep"]["rdma_bytes"]
    one_node = step_estimate(v3, 8, 4096, Cluster())
    assert one_node["deepep"]["rdma_bytes"] == one_node["leanmoe"]["rdma_bytes"] == 0
    assert one_node["leanmoe"]["seconds"] == pytest.approx(one_node["deepep"]["seconds"], rel=0.02)
    with pytest.raises(ValueError, match="divide"):
        routing_stats(v3, 3, 8)


def test_command_line(capsys):
    assert main(["--deepep-check"]) == 0
    out = capsys.readouterr().out
    assert "| 8 | NVLink |" in out and "153 GB/s" in out
    assert main(["--preset", "small", "--ep", "8", "--tokens-per-rank", "1024"]) == 0
    assert "| leanmoe |" in capsys.readouterr().out
