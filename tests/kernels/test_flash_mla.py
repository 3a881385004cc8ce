"""leanmoe.kernels.flash_mla held to FlashMLA's own dense-decoding test (deepseek-ai/FlashMLA
tests/test_flash_mla.py and its successors): the same test data (NaN in every cache slot no
sequence owns, out-of-range ids in unused block-table entries, empty sequences), the same
reference math re-derived here (including FlashMLA's out = 0, lse = +inf for a query row that
sees no key), and the same calling code, the face imported in place of `flash_mla`. Small
shapes on CPU: the batched torch path, and the Triton kernel under the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton kernels run on CPU

import dataclasses
import math
import random

import pytest
import torch

import leanmoe.kernels.flash_mla as flash_mla
from leanmoe.kernels import dispatch

needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@dataclasses.dataclass
class TestParam:
    __test__ = False  # a parameter record, not a test class

    b: int  # batch size
    s_q: int  # queries per sequence
    s_k: int  # keys per sequence (the mean when is_varlen)
    is_varlen: bool
    is_causal: bool
    have_zero_seqlen_k: bool = False
    block_size: int = 64
    h_q: int = 16
    h_kv: int = 1
    d: int = 576  # q/k head size: dv + the RoPE part
    dv: int = 512
    seed: int = 0


def generate_test_data(t: TestParam):
    """-> cache_seqlens [b] int32, q [b, s_q, h_q, d], block_table [b, max_blocks] int32,
    blocked_k [n_blocks, block_size, h_kv, d]. Every slot outside a sequence holds NaN and every
    table entry past a sequence's blocks an id far out of range, so any stray read shows."""
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    lens = torch.full((t.b,), t.s_k, dtype=torch.int32)
    if t.is_varlen:
        for i in range(t.b):
            lens[i] = max(int(random.normalvariate(t.s_k, t.s_k / 2)), t.s_q)
    if t.have_zero_seqlen_k:
        lens[torch.randn(t.b) > 0] = 0
    max_seqlen_pad = math.ceil(int(lens.max()) / 256) * 256
    q = (torch.randn(t.b, t.s_q, t.h_q, t.d) / 10).clamp(-1.0, 1.0).bfloat16()
    n_blocks = t.b * max_seqlen_pad // t.block_size
    block_table = torch.randperm(n_blocks).to(torch.int32).view(t.b, -1)
    blocked_k = (torch.randn(n_blocks, t.block_size, t.h_kv, t.d) / 10).clamp(-1.0, 1.0).bfloat16()
    for i in range(t.b):
        n = int(lens[i])
        used = math.ceil(n / t.block_size)
        blocked_k[block_table[i, used:].long()] = float("nan")
        if n % t.block_size:
            blocked_k[block_table[i, used - 1], n % t.block_size:] = float("nan")
        block_table[i, used:] = 2147480000
    return lens, q, block_table, blocked_k


def reference_torch(cache_seqlens, block_table, q, blocked_k, dv, is_causal):
    """Per sequence: gather its keys, attend in fp32 (causal: query i of s_q sits at position
    s_k - s_q + i). A row with no visible key gets out = 0 and lse = +inf, FlashMLA's convention."""
    b, s_q, h_q, d = q.shape
    bs = blocked_k.shape[1]
    out = torch.empty(b, s_q, h_q, dv)
    lse = torch.empty(b, h_q, s_q)
    for i in range(b):
        n = int(cache_seqlens[i])
        kv = blocked_k[block_table[i, :math.ceil(n / bs)].long()].reshape(-1, d)[:n].float()  # h_kv = 1
        kv = torch.nan_to_num(kv, nan=0.0)
        scores = q[i].float().transpose(0, 1) @ kv.T / math.sqrt(d)  # [h_q, s_q, n]
        if is_causal and s_q > 1:
            visible = torch.ones(s_q, n, dtype=torch.bool).tril(diagonal=n - s_q)
            scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = scores.logsumexp(dim=-1)  # [h_q, s_q]
        row_out = torch.softmax(scores, dim=-1) @ kv[:, :dv]  # [h_q, s_q, dv]
        lonely = row_lse == float("-inf")
        row_out[lonely] = 0.0
        row_lse[lonely] = float("inf")
        out[i], lse[i] = row_out.transpose(0, 1), row_lse
    return out.to(q.dtype), lse


CASES = [
    TestParam(b, s_q, s_k, is_varlen, is_causal, h_q=h_q)
    for b, s_q, s_k, is_varlen in [(1, 1, 20, False), (2, 2, 140, True), (3, 4, 140, True)]
    for h_q in (1, 3, 16)
    for is_causal in (False, True)
] + [TestParam(4, 2, 140, True, is_causal, have_zero_seqlen_k=True, h_q=3, seed=0) for is_causal in (False, True)]


@torch.inference_mode()
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("t", CASES, ids=lambda t: f"b{t.b}-sq{t.s_q}-sk{t.s_k}-h{t.h_q}-var{int(t.is_varlen)}-"
                                               f"causal{int(t.is_causal)}-empty{int(t.have_zero_seqlen_k)}")
def test_flash_mla(t: TestParam, backend):
    cache_seqlens, q, block_table, blocked_k = generate_test_data(t)
    if t.have_zero_seqlen_k:
        assert (cache_seqlens == 0).any() and (cache_seqlens > 0).any()

    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata()

    def run_flash_mla():
        return flash_mla.flash_mla_with_kvcache(
            q,
            blocked_k,
            block_table,
            cache_seqlens,
            t.dv,
            tile_scheduler_metadata,
            num_splits,
            causal=t.is_causal,
        )

    out_ans, lse_ans = run_flash_mla()
    out_ref, lse_ref = reference_torch(cache_seqlens, block_table, q, blocked_k, t.dv, t.is_causal)
    assert out_ans.shape == (t.b, t.s_q, t.h_q, t.dv) and out_ans.dtype == q.dtype
    assert lse_ans.shape == (t.b, t.h_q, t.s_q) and lse_ans.dtype == torch.float32
    # FlashMLA's bounds: out within 8e-4 + 2/128 relative (bf16), lse within 1e-6 + 8/65536 relative
    torch.testing.assert_close(out_ans.float(), out_ref.float(), atol=8e-4, rtol=2.01 / 128)
    torch.testing.assert_close(lse_ans, lse_ref, atol=1e-6, rtol=8.01 / 65536)


@torch.inference_mode()
def test_old_metadata_interface():
    # FlashMLA's first interface: metadata from (cache_seqlens, s_q * h_q // h_kv, h_kv)
    t = TestParam(2, 2, 140, True, True, h_q=4)
    cache_seqlens, q, block_table, blocked_k = generate_test_data(t)
    tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata(cache_seqlens, t.s_q * t.h_q // t.h_kv, t.h_kv)
    out, lse = flash_mla.flash_mla_with_kvcache(q, blocked_k, block_table, cache_seqlens, t.dv,
                                                tile_scheduler_metadata, num_splits, causal=t.is_causal)
    out_ref, lse_ref = reference_torch(cache_seqlens, block_table, q, blocked_k, t.dv, t.is_causal)
    torch.testing.assert_close(out.float(), out_ref.float(), atol=8e-4, rtol=2.01 / 128)
    torch.testing.assert_close(lse, lse_ref, atol=1e-6, rtol=8.01 / 65536)


def test_what_leanmoe_lacks_raises_not_implemented():
    t = TestParam(1, 1, 20, False, False, h_q=2)
    cache_seqlens, q, block_table, blocked_k = generate_test_data(t)
    meta, splits = flash_mla.get_mla_metadata()

    def call(k=blocked_k, **kw):
        return flash_mla.flash_mla_with_kvcache(q, k, block_table, cache_seqlens, t.dv, meta, splits, **kw)

    with pytest.raises(NotImplementedError, match="FP8 KV cache"):
        call(is_fp8_kvcache=True)
    with pytest.raises(NotImplementedError, match="sparse attention"):
        call(indices=torch.zeros(1, 1, 8, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="attention sinks"):
        call(attn_sink=torch.zeros(t.h_q))
    with pytest.raises(NotImplementedError, match="extra KV cache"):
        call(extra_k_cache=blocked_k)
    with pytest.raises(NotImplementedError, match="2 KV heads"):
        call(k=blocked_k.expand(-1, -1, 2, -1))
    with pytest.raises(NotImplementedError, match="several KV heads"):
        flash_mla.get_mla_metadata(cache_seqlens, 8, 2)
    with pytest.raises(NotImplementedError, match="FP8 KV cache"):
        flash_mla.get_mla_metadata(cache_seqlens, 8, 1, is_fp8_kvcache=True)
    with pytest.raises(NotImplementedError, match="sparse attention"):
        flash_mla.flash_mla_sparse_fwd(q[0], blocked_k[0], None, 0.1)
    with pytest.raises(NotImplementedError, match="prefill"):
        flash_mla.flash_attn_varlen_func(q, q, q, None, None, 1, 1)
    with pytest.raises(ValueError, match="block_table and cache_seqlens"):
        flash_mla.flash_mla_with_kvcache(q, blocked_k, None, None, t.dv, meta, splits)
