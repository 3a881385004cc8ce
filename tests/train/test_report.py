import json
import math

import pytest
import torch

from leanmoe import ModelConfig
from leanmoe.train.config import TrainConfig
from leanmoe.train.cost import GPUS
from leanmoe.train.report import (
    ProgressDisplay,
    RunSummary,
    TrainResult,
    device_name,
    fmt_eta,
    read_metrics,
    write_report,
)

N_MOE = 6  # tiny: layers 1-5 and the MTP module are MoE; layer 0 is dense
ELAPSED, TOKENS, TPS = 72.0, 3 * 8 * 32, 1000.0


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return ModelConfig.from_preset("tiny").replace(num_nextn_predict_layers=1)  # with an MTP module's load row


@pytest.fixture(scope="module")
def tc(tiny) -> TrainConfig:
    return TrainConfig(seq_len=32, batch_size=8, micro_batch_size=8, lr=1e-3, warmup_steps=1, max_steps=3,
                       dtype="fp32").resolved(tiny, torch.device("cpu"))


@pytest.fixture
def run_dir(tmp_path):
    ratios = [1.5, 2.0, 2.5]  # layer 1's max/mean per step; other layers 1.25
    records = [{"step": s, "loss": 8.0 - s, "lm_loss": 7.5 - s, "load_max_over_mean": [r] + [1.25] * (N_MOE - 1)}
               for s, r in enumerate(ratios)]
    records[-1]["val_loss"] = 5.5
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return tmp_path


def _load_total() -> torch.Tensor:
    load = torch.full((N_MOE, 16), 10.0)
    load[0, 0], load[0, 1] = 40.0, 2.0  # layer 1: max/mean 40 / (182/16), least-used share 2/182
    return load


def _summary(tc, cfg, run_dir, **kw) -> RunSummary:
    result = TrainResult(run_dir=run_dir, steps=3, tokens=TOKENS, elapsed=ELAPSED, final_loss=6.0, val_loss=5.5,
                         val_bpb=1.25, tokens_per_second=TPS, checkpoint=None, report=None,
                         interrupted=kw.pop("interrupted", False))
    kw.setdefault("load_total", _load_total())
    return RunSummary(train_config=tc, model_config=cfg, result=result, world_size=kw.pop("world_size", 1),
                      device_type="cpu", device_name="Test CPU (2 threads)", **kw)


def test_cpu_report_has_every_section(tc, tiny, run_dir):
    path = write_report(_summary(tc, tiny, run_dir), run_dir)
    assert path == run_dir / "report.md" and not (run_dir / ".report.md.tmp").exists()
    text = path.read_text()
    for section in (f"# Training report: {run_dir.name}", "## Model", "## Run", "## Compute and cost",
                    "## Expert load balance", "![loss](loss.png)", "![expert load](expert_load.png)"):
        assert section in text, section
    assert "device: Test CPU (2 threads)" in text and "dtype fp32" in text
    assert f"| 3 | {TOKENS:,} | 72.0 s | 1,000 | 6.0000 | 5.5000 | 1.2500 |" in text
    # one micro-batch per step: no accumulation clause
    assert "Batch 8 x 32 tokens, peak lr 0.001 (wsd, 1 warm-up steps)" in text
    assert "data: the Python standard library" in text
    assert "MFU is not meaningful on the CPU" in text and "GPU-hours" not in text
    assert f"Device-hours: {ELAPSED / 3600:.3f} (pass --price-per-hour" in text
    assert f"{tiny.flops_per_token(32) * TOKENS:.3g}" in text
    assert "Estimate, not a measurement" in text
    assert "| layer 1 | 3.52 | 2.00 | 2.50 | 1.10% |" in text
    assert "| MTP 1 | 1.00 | 1.25 | 1.25 | 6.25% |" in text
    assert "| layer 0 |" not in text  # dense
    assert "## Samples" not in text and "--resume" not in text
    for png in ("loss.png", "expert_load.png"):
        assert (run_dir / png).stat().st_size > 1000


def test_gpu_report_has_mfu_and_gpu_hours(tc, tiny, run_dir):
    gpu = GPUS["h100"]
    text = write_report(_summary(tc, tiny, run_dir, gpu=gpu, peak_memory_gib=1.3), run_dir).read_text()
    mfu = tiny.flops_per_token(32) * TPS / gpu.peak_flops("bf16")
    assert f"- MFU: {mfu:.1%} of 1 x H100 at 989 TFLOP/s dense BF16 peak each." in text
    hours = ELAPSED / 3600
    assert f"- GPU-hours: {hours:.3f}; cost at $2.50/GPU-hour: ${hours * 2.5:.2f}." in text
    assert "MFU is not meaningful" not in text
    assert "Peak GPU memory allocated: 1.3 GiB." in text


def test_price_per_hour_overrides_the_table_and_prices_cpu_hours(tc, tiny, run_dir):
    priced = TrainConfig(**{**tc.to_dict(), "price_per_hour": 4.0})
    text = write_report(_summary(priced, tiny, run_dir, gpu=GPUS["h100"]), run_dir).read_text()
    assert f"cost at $4.00/GPU-hour: ${ELAPSED / 3600 * 4:.2f}." in text
    text = write_report(_summary(priced, tiny, run_dir), run_dir).read_text()
    assert f"- Device-hours: {ELAPSED / 3600:.3f}; cost at $4.00/hour: ${ELAPSED / 3600 * 4:.4f}." in text


def test_accumulation_processes_interruption_and_samples(tiny, run_dir):
    tc = TrainConfig(seq_len=32, batch_size=16, micro_batch_size=2, lr=1e-3, warmup_steps=1, max_steps=3,
                     data=["a.txt", "hf:x"]).resolved(tiny, torch.device("cpu"), world_size=2)
    last_eval = {"samples": [{"prompt": "def f(", "completion": "x): return x"}]}
    summary = _summary(tc, tiny, run_dir, world_size=2, interrupted=True, last_eval=last_eval, peak_memory_gib=3.0)
    text = write_report(summary, run_dir).read_text()
    assert "Batch 16 x 32 tokens (4 micro-batches of 2 on each of 2 processes)" in text
    assert "data: a.txt, hf:x." in text
    assert "Peak GPU memory allocated: 3.0 GiB (rank 0)." in text
    assert "can be resumed with `--resume`" in text
    assert "## Samples (last validation)" in text and "def f(x): return x" in text
    assert f"Device-hours: {2 * ELAPSED / 3600:.3f}" in text  # device-hours count every process


def test_without_moe_layers_or_metrics(tc, tiny, tmp_path):
    text = write_report(_summary(tc, tiny, tmp_path, load_total=None), tmp_path).read_text()
    assert "No MoE layers in this model." in text
    assert "![loss]" not in text and not (tmp_path / "loss.png").exists()
    assert not (tmp_path / "expert_load.png").exists()
    assert read_metrics(tmp_path) == []


def test_read_metrics_skips_blank_lines(run_dir):
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n\n{"step": 1, "loss": 0.5}\n')
    assert read_metrics(run_dir) == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]


# ---------------------------------------------------------------------------- the live display
@pytest.mark.parametrize("seconds,text", [(0, "0:00"), (59.9, "0:59"), (65, "1:05"), (3600, "1:00:00"),
                                          (3723, "1:02:03"), (100 * 3600, "100:00:00"), (math.inf, "?"),
                                          (math.nan, "?"), (-1, "?")])
def test_fmt_eta(seconds, text):
    assert fmt_eta(seconds) == text


def test_disabled_display_prints_nothing(capsys):
    d = ProgressDisplay(enabled=False)
    d.say("hello")
    d.open()
    assert d.bar is None
    d.update(0.5, 3, 2.0, 1000.0, None, 10.0)
    d.evaluation(3, {"val_loss": 1.0, "val_bpb": 0.5, "samples": [{"prompt": "a", "completion": "b"}]})
    d.close()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_enabled_display_says_and_prints_evaluations_without_a_bar(capsys):
    d = ProgressDisplay(enabled=True)
    d.say("hello")
    samples = [{"prompt": f"p{i}", "completion": "c" * 200} for i in range(3)]
    d.evaluation(7, {"val_loss": 1.23456, "val_bpb": 0.5, "samples": samples})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[leanmoe] hello"
    assert out[1] == "step 7: val_loss 1.2346, val_bpb 0.5000"
    assert len(out) == 4 and out[2] == f"  'p0' -> {'c' * 120!r}"  # two samples, completions cut at 120


@pytest.mark.parametrize("native", [True, False])
def test_cpu_device_name_says_its_vector_instructions_and_bf16(monkeypatch, native):
    """Two hosts named "AMD EPYC" trained 2.5x apart (AVX512 with bf16 against AVX2): the name tells them apart."""
    import leanmoe.train.report as report_mod

    monkeypatch.setattr(report_mod, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512" if native else "AVX2")
    name = device_name(torch.device("cpu"))
    assert name.endswith("threads, AVX512, native bf16)" if native else "threads, AVX2)"), name
