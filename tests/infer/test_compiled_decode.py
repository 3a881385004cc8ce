"""The compiled decode step (EngineConfig.compile, ModelRunner.compile_decode) against the eager one
and the definition of greedy decoding; its custom ops against their eager bodies; and what happens
when compiling fails. These tests compile for real (seconds each, cached by inductor on disk)."""

import pytest
import torch

from leanmoe.infer import LLM, SamplingParams
from leanmoe.infer.config import EngineConfig
from leanmoe.infer.paged_cache import _write_latents_op
from leanmoe.kernels.grouped_gemm import _expert_mlp_op, expert_mlp_reference
from leanmoe.kernels.mla_decode import mla_decode, mla_decode_op
from tests.infer.helpers import greedy_reference, make_drafting_model, random_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drafting_model():
    return make_drafting_model(eps=0.3)


def test_compiled_greedy_equals_eager_and_reference(drafting_model):
    """Batch 1 and larger batches (two graphs), across block boundaries (the table widens), with and
    without MTP drafting (two query tokens a sequence): the same tokens as a full forward."""
    prompts = random_prompts([3, 17, 9, 30, 5], seed=5)
    n = 24
    refs = [greedy_reference(drafting_model, p, n) for p in prompts]
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for speculative in (False, True):
        llm = LLM(drafting_model, block_size=8, speculative=speculative, compile="on")
        assert [o.token_ids for o in llm.generate(prompts[:1], sp)] == refs[:1]  # batch 1
        assert [o.token_ids for o in llm.generate(prompts, sp)] == refs
        assert llm.runner.compile_status.startswith("compiled"), llm.runner.compile_status
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_warmup_writes_nothing_a_request_reads(drafting_model):
    prompts = random_prompts([4, 11], seed=6)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(drafting_model, block_size=8, speculative=False, compile="on")
    status = llm.runner.compile_decode(warmup=True)
    assert status.startswith("compiled (torch.compile; warm-up"), status
    assert llm.runner.backend.metadata is None
    refs = [greedy_reference(drafting_model, p, 12) for p in prompts]
    # after the warm-up only the guards that pick a graph are checked: both graphs must still be picked right
    assert [o.token_ids for o in llm.generate(prompts, sp)] == refs
    assert [o.token_ids for o in llm.generate(prompts[1:], sp)] == refs[1:]
    three = random_prompts([2, 20, 7], seed=8)
    assert [o.token_ids for o in llm.generate(three, sp)] == [greedy_reference(drafting_model, p, 12) for p in three]


def test_auto_compiles_fp32_on_cpu_unless_turned_off(monkeypatch):
    cfg = EngineConfig(device="cpu", dtype="fp32", compile="auto")
    monkeypatch.setenv("LEANMOE_COMPILE", "1")
    assert cfg.compile_decode
    monkeypatch.setenv("LEANMOE_COMPILE", "0")
    assert not cfg.compile_decode
    assert not EngineConfig(device="cpu", dtype="fp32", compile="off").compile_decode
    assert EngineConfig(device="cpu", dtype="fp32", compile="on").compile_decode
    monkeypatch.setenv("LEANMOE_COMPILE", "1")
    assert not EngineConfig(device="cpu", dtype="bf16", compile="auto").compile_decode
    with pytest.raises(ValueError, match="compile='yes'; choose one of auto, on, off"):
        LLM(make_drafting_model(), compile="yes")


def _failing_compile(fn, **kwargs):
    def run(*a, **k):
        raise torch._dynamo.exc.InternalTorchDynamoError("no C++ compiler")
    return run


def test_a_failed_compile_falls_back_under_auto_and_raises_under_on(drafting_model, monkeypatch):
    monkeypatch.setattr(torch, "compile", _failing_compile)
    monkeypatch.setenv("LEANMOE_COMPILE", "1")
    prompt = random_prompts([6], seed=7)[0]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(drafting_model, block_size=8, speculative=False, compile="auto")
    assert llm.generate([prompt], sp)[0].token_ids == greedy_reference(drafting_model, prompt, 6)
    assert llm.runner.compile_status == "eager (torch.compile failed: InternalTorchDynamoError: no C++ compiler)"
    strict = LLM(drafting_model, block_size=8, speculative=False, compile="on")
    with pytest.raises(RuntimeError, match="compile='on': compiling the decode step failed: InternalTorchDynamoError"):
        strict.runner.compile_decode(warmup=True)


def test_custom_ops_match_their_eager_bodies():
    torch.manual_seed(0)
    nb, bs, d, dv = 6, 4, 20, 16
    kv = torch.randn(nb, bs, 1, d)
    q = torch.randn(2, 1, 4, d)
    table = torch.tensor([[3, 1, 0], [5, 2, 4]], dtype=torch.int32)
    lens = torch.tensor([9, 5], dtype=torch.int32)
    want, _ = mla_decode(q, kv, table, lens, dv, 0.3, True)
    torch.testing.assert_close(mla_decode_op(q, kv, table, lens, dv, 0.3, True), want)
    torch.library.opcheck(mla_decode_op, (q, kv, table, lens, dv, 0.3, True))
    slots = torch.zeros(nb * bs, d)
    idx, src = torch.tensor([7, 0, 22]), torch.randn(3, d)
    _write_latents_op(slots, idx, src)
    assert torch.equal(slots[idx], src) and slots.count_nonzero() == src.count_nonzero()
    torch.library.opcheck(_write_latents_op, (torch.zeros(nb * bs, d), idx, src))
    x, w1, w2 = torch.randn(5, 8), torch.randn(3, 12, 8), torch.randn(3, 8, 6)
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    torch.testing.assert_close(_expert_mlp_op(x, w1, w2, offs), expert_mlp_reference(x, w1, w2, offs))
    torch.library.opcheck(_expert_mlp_op, (x, w1, w2, offs))
