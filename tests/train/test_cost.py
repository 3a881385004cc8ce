import json

import pytest

from leanmoe import ModelConfig
from leanmoe.cli import main
from leanmoe.train.cost import estimate_cost, find_gpu, parse_count


def test_parse_count():
    assert parse_count("14.8T") == pytest.approx(14.8e12)
    assert parse_count("500M") == 500e6 and parse_count("2.5b") == 2.5e9 and parse_count("1e9") == 1e9
    assert parse_count("123") == 123 and parse_count(7) == 7
    with pytest.raises(ValueError, match="14.8T"):
        parse_count("lots")


def test_deepseek_v3_pretraining_line():
    """DeepSeek-V3 report, table 1: 2.664M H800 GPU-hours for 14.8T tokens, $5.328M at $2/h."""
    cfg = ModelConfig.from_preset("deepseek-v3")
    implied = estimate_cost(cfg, "14.8T", "h800", gpu_hours=2.664e6)
    assert implied.cost_usd == pytest.approx(5.328e6)
    assert 0.35 < implied.mfu < 0.45  # a plausible BF16-peak MFU (about 20% of the FP8 peak)
    at_40 = estimate_cost(cfg, "14.8T", "h800", mfu=0.4)
    assert at_40.gpu_hours == pytest.approx(2.664e6, rel=0.05)
    assert at_40.cost_usd == pytest.approx(5.328e6, rel=0.05)
    fp8 = estimate_cost(cfg, "14.8T", "h800", gpu_hours=2.664e6, precision="fp8")
    assert fp8.mfu == pytest.approx(implied.mfu / 2, rel=1e-3)


def test_three_ways_agree():
    cfg = ModelConfig.from_preset("small")
    a = estimate_cost(cfg, "10B", "h100", mfu=0.3, seq_len=2048)
    b = estimate_cost(cfg, "10B", "h100", tokens_per_second=a.tokens_per_second, seq_len=2048)
    c = estimate_cost(cfg, "10B", "h100", gpu_hours=a.gpu_hours, seq_len=2048)
    for e in (b, c):
        assert e.mfu == pytest.approx(0.3) and e.gpu_hours == pytest.approx(a.gpu_hours)
    assert a.total_flops == pytest.approx(cfg.flops_per_token(2048) * 10e9)
    assert estimate_cost(cfg, "10B", "h100", mfu=0.3, seq_len=2048, price_per_hour=1.0).cost_usd == pytest.approx(a.gpu_hours)


def test_errors():
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="exactly one"):
        estimate_cost(cfg, "1B", "h100")
    with pytest.raises(ValueError, match="exactly one"):
        estimate_cost(cfg, "1B", "h100", mfu=0.5, gpu_hours=3)
    with pytest.raises(ValueError, match="unknown GPU"):
        estimate_cost(cfg, "1B", "tpu-v9", mfu=0.5)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        estimate_cost(cfg, "1B", "h100", mfu=40)
    with pytest.raises(ValueError, match="no FP8"):
        estimate_cost(cfg, "1B", "a100", mfu=0.5, precision="fp8")


def test_find_gpu_from_device_names():
    assert find_gpu("NVIDIA H100 80GB HBM3").name == "h100"
    assert find_gpu("NVIDIA A100-SXM4-80GB").name == "a100"
    assert find_gpu("NVIDIA A10G").name == "a10"
    assert find_gpu("NVIDIA L40S").name == "l40s"
    assert find_gpu("NVIDIA GeForce RTX 4090").name == "rtx4090"
    assert find_gpu("NVIDIA GB200").name == "gb200"
    assert find_gpu("Tesla T4") is None


def test_cli_json_and_text(capsys):
    assert main(["cost", "--preset", "deepseek-v3", "--tokens", "14.8T", "--gpu", "h800", "--gpu-hours", "2.664M",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"flops_per_token", "total_flops", "gpu_hours", "cost_usd", "mfu"} <= set(out)
    assert out["cost_usd"] == pytest.approx(5.328e6)
    assert main(["cost", "--tokens", "14.8T", "--mfu", "0.4", "--price-per-hour", "2"]) == 0
    text = capsys.readouterr().out
    assert "GPU-hours" in text and "$5,4" in text
    assert main(["cost", "--tokens", "many", "--mfu", "0.4"]) == 2
    assert "cannot read 'many'" in capsys.readouterr().err
