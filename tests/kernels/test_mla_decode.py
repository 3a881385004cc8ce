import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton kernels run on CPU

import math

import pytest
import torch
import torch.nn.functional as F

from leanmoe import LatentCache, Transformer
from leanmoe.infer.paged_cache import paged_mla_attend
from leanmoe.kernels import dispatch
from leanmoe.kernels import cpu_kernels, mla_decode as mla_decode_module
from leanmoe.kernels.mla_decode import (mla_decode, mla_decode_cpu, mla_decode_reference, mla_decode_torch,
                                        mla_decode_triton)
from tests.util import micro_config

needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="triton is not installed")


V3 = micro_config().replace(kv_lora_rank=512, qk_rope_head_dim=64)  # DeepSeek-V3's latent: 512 + 64
MICRO = micro_config()  # 12 + 4


def _case(b, s_q, h_q, cfg, block_size, lens, dtype=torch.bfloat16, shuffle=True):
    """FlashMLA's test setup: a paged cache whose every slot outside a sequence holds NaN, so
    any out-of-range read poisons the output."""
    d, dv = cfg.latent_dim, cfg.kv_lora_rank
    max_blocks = max(1, max(-(-n // block_size) for n in lens))
    n_blocks = b * max_blocks + 2
    order = torch.randperm(n_blocks) if shuffle else torch.arange(n_blocks)
    block_table = order[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    kv = torch.randn(n_blocks, block_size, 1, d).to(dtype)
    valid = torch.zeros(n_blocks, block_size, dtype=torch.bool)
    for i, n in enumerate(lens):
        for t in range(n):
            valid[block_table[i, t // block_size], t % block_size] = True
    kv[~valid] = float("nan")
    q = torch.randn(b, s_q, h_q, d).to(dtype)
    return q, kv, block_table, torch.tensor(lens, dtype=torch.int32), dv


def _sdpa_reference(q, kv, block_table, seqlens, dv, scale, causal):
    """FlashMLA's own test reference: gather, then scaled_dot_product_attention per sequence."""
    b, s_q, h_q, d = q.shape
    bs = kv.shape[1]
    outs, lses = [], []
    for i, n in enumerate(seqlens.tolist()):
        k = kv[block_table[i, : -(-n // bs)].long(), :, 0].reshape(-1, d)[:n].float()
        qi = q[i].float().transpose(0, 1)  # [h, s_q, d]
        mask = None
        if causal:
            mask = torch.arange(n)[None, :] <= torch.arange(n - s_q, n)[:, None]
        outs.append(F.scaled_dot_product_attention(qi, k[None], k[None, :, :dv], attn_mask=mask, scale=scale)
                    .transpose(0, 1))
        s = qi @ k.T * scale
        lses.append(torch.logsumexp(s if mask is None else s.masked_fill(~mask, float("-inf")), dim=-1))
    return torch.stack(outs), torch.stack(lses)


def _assert_matches(out, lse, ref_out, ref_lse, dtype):
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert not out.isnan().any(), "read past a sequence (NaN padding leaked)"
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)


def test_reference_matches_sdpa_and_is_fp32():
    q, kv, bt, lens, dv = _case(3, 2, 4, MICRO, 5, [17, 3, 33], torch.float32)
    scale = 0.3
    for causal in (False, True):
        out, lse = mla_decode_reference(q, kv, bt, lens, dv, scale, causal)
        ref_out, ref_lse = _sdpa_reference(q, kv, bt, lens, dv, scale, causal)
        _assert_matches(out, lse, ref_out, ref_lse, torch.float32)
        assert lse.shape == (3, 4, 2) and lse.dtype == torch.float32


PATHS = {"torch": mla_decode_torch, "C kernel": mla_decode_cpu}  # the CPU's two batched paths


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("block_size", [1, 5, 64])
@pytest.mark.parametrize("s_q,causal", [(1, False), (1, True), (2, True), (3, True), (2, False)])
def test_batched_cpu_paths_match_reference(path, block_size, s_q, causal):
    # empty, shorter than s_q, ragged; NaN in every padding slot; table entries past a
    # sequence's blocks set to -1 (they must never be dereferenced)
    lens = [0, 1, 19, 70]
    q, kv, bt, seqlens, dv = _case(4, s_q, 3, MICRO, block_size, lens, torch.float32)
    for i, n in enumerate(lens):
        bt[i, -(-n // block_size):] = -1
    out, lse = PATHS[path](q, kv, bt, seqlens, dv, 0.3, causal)
    _assert_matches(out, lse, *mla_decode_reference(q, kv, bt, seqlens, dv, 0.3, causal), torch.float32)
    assert (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    # DeepSeek-V3's latent sizes; bf16 inputs where the path takes them (the C kernel is fp32 only)
    dtype = torch.bfloat16 if path == "torch" else torch.float32
    q, kv, bt, seqlens, dv = _case(2, s_q, 8, V3, block_size, [40, 7], dtype)
    _assert_matches(*PATHS[path](q, kv, bt, seqlens, dv, causal=causal),
                    *mla_decode_reference(q, kv, bt, seqlens, dv, causal=causal), dtype)


@pytest.mark.parametrize("path", list(PATHS))
def test_batched_cpu_paths_empty_sequence_on_a_nan_slot_zero(path):
    # the empty sequence owns block 0, so the cache's slot 0 (where the torch path's padding points) holds NaN
    q, kv, bt, seqlens, dv = _case(2, 1, 3, MICRO, 4, [0, 9], torch.float32, shuffle=False)
    assert bt[0, 0] == 0 and kv.view(-1, kv.shape[-1])[0].isnan().all()
    out, lse = PATHS[path](q, kv, bt, seqlens, dv, 0.3, causal=True)
    _assert_matches(out, lse, *mla_decode_reference(q, kv, bt, seqlens, dv, 0.3, True), torch.float32)
    assert (out[0] == 0).all()


def test_cpu_kernel_is_built_here():
    # the project's machines have a C compiler: a kernel that silently failed to build would leave
    # the tests of it exercising nothing
    assert cpu_kernels.library() is not None, cpu_kernels.status()
    assert cpu_kernels.status().startswith("on")


def test_cpu_kernel_same_result_at_any_thread_count():
    # work is split over (sequence, chunk of query rows): one sequence at 1, 2 and 3 threads
    q, kv, bt, seqlens, dv = _case(1, 2, 5, MICRO, 4, [23], torch.float32)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(mla_decode_cpu(q, kv, bt, seqlens, dv, 0.3, True))
    finally:
        torch.set_num_threads(before)
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-6, atol=1e-6)


def test_cpu_kernel_refuses_what_it_does_not_handle():
    q, kv, bt, seqlens, dv = _case(1, 1, 2, MICRO, 4, [5], torch.bfloat16)
    with pytest.raises(RuntimeError, match="fp32 CPU tensors"):
        mla_decode_cpu(q, kv, bt, seqlens, dv)
    with pytest.raises(ValueError, match="head_dim_v"):
        mla_decode_cpu(q.float(), kv.float(), bt, seqlens, 0)
    # what would read outside the cache is refused before anything is read (a C kernel would crash)
    q, kv = q.float(), kv.float()
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_decode_cpu(q, kv, bt, seqlens + bt.shape[1] * 4, dv)
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_decode_cpu(q, kv, bt, seqlens - 6, dv)
    for bad in (-1, kv.shape[0]):
        table = bt.clone()
        table[0, 0] = bad
        with pytest.raises(ValueError, match="outside the cache"):
            mla_decode_cpu(q, kv, table, seqlens, dv)


def test_dispatch_on_cpu(monkeypatch):
    # fp32 on the CPU with few heads: the C kernel; bf16, or many heads: the batched torch path
    called = []
    for name in ("mla_decode_cpu", "mla_decode_torch"):
        real = getattr(mla_decode_module, name)
        monkeypatch.setattr(mla_decode_module, name, lambda *a, _real=real, _n=name, **k: called.append(_n) or _real(*a, **k))
    monkeypatch.delenv("LEANMOE_TRITON_INTERPRET", raising=False)
    for dtype, heads in ((torch.float32, 2), (torch.bfloat16, 2), (torch.float32, 40)):
        q, kv, bt, seqlens, dv = _case(2, 1, heads, MICRO, 4, [5, 9], dtype)
        mla_decode_module.mla_decode(q, kv, bt, seqlens, dv, causal=True)
    # many query rows per sequence: real GEMMs, where the torch path measured faster
    assert mla_decode_module.CPU_KERNEL_MAX_ROWS < 40
    assert called == ["mla_decode_cpu", "mla_decode_torch", "mla_decode_torch"]


def test_cpu_kernels_without_a_compiler_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANMOE_CACHE", str(tmp_path))  # nothing built there yet
    try:
        cpu_kernels.library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        assert cpu_kernels.library() is None
        assert "failed" in cpu_kernels.status() and "no-such-cc" in cpu_kernels.status()
        q, kv, bt, seqlens, dv = _case(1, 1, 2, MICRO, 4, [5], torch.float32)
        assert not dispatch.use_cpu_kernel(q, kv)  # mla_decode then takes the torch path
        cpu_kernels.library.cache_clear()
        monkeypatch.setenv("LEANMOE_CPU_KERNELS", "0")
        assert cpu_kernels.library() is None and "LEANMOE_CPU_KERNELS=0" in cpu_kernels.status()
    finally:
        cpu_kernels.library.cache_clear()
        monkeypatch.undo()
        assert cpu_kernels.library() is not None


@needs_triton
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_deepseek_v3_latent(s_q, causal):
    # d = 576, dv = 512 (from the config, not hard-coded), variable lengths, 64-token blocks
    q, kv, bt, lens, dv = _case(2, s_q, 16, V3, 64, [100, 37])
    assert (q.shape[-1], dv) == (576, 512)
    out, lse = mla_decode_triton(q, kv, bt, lens, dv, causal=causal, num_splits=2)
    assert out.shape == (2, s_q, 16, 512) and out.dtype == torch.bfloat16 and lse.shape == (2, 16, s_q)
    _assert_matches(out, lse, *mla_decode_reference(q, kv, bt, lens, dv, causal=causal), torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (3, True), (2, False)])
def test_triton_any_block_size_split_and_length(block_size, num_splits, s_q, causal):
    # lengths: empty, shorter than s_q (causal rows that see nothing: lse = -inf), ragged
    lens = [0, 1, 19, 70]
    q, kv, bt, seqlens, dv = _case(4, s_q, 4, MICRO, block_size, lens, torch.float32)
    scale = 0.25
    out, lse = mla_decode_triton(q, kv, bt, seqlens, dv, scale, causal, num_splits=num_splits)
    _assert_matches(out, lse, *mla_decode_reference(q, kv, bt, seqlens, dv, scale, causal), torch.float32)


@pytest.mark.slow
@needs_triton
def test_triton_long_context_split_kv():
    q, kv, bt, lens, dv = _case(2, 1, 16, V3, 64, [1000, 333])
    ref = mla_decode_reference(q, kv, bt, lens, dv)
    for splits in (1, 7):
        _assert_matches(*mla_decode_triton(q, kv, bt, lens, dv, num_splits=splits), *ref, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("tile_config", [(16, 16, 4, 2), (32, 64, 8, 3)])
def test_triton_tile_configs(tile_config, monkeypatch):
    # odd rows (s_q * h_q = 6) and lengths: every tile shape the bench sweep may pick gives the same result
    q, kv, bt, lens, dv = _case(3, 2, 3, MICRO, 16, [1, 37, 70], torch.float32)
    ref = mla_decode_reference(q, kv, bt, lens, dv, causal=True)
    monkeypatch.setenv("LEANMOE_TRITON_INTERPRET", "1")
    _assert_matches(*mla_decode(q, kv, bt, lens, dv, causal=True, tile_config=tile_config), *ref, torch.float32)
    with pytest.raises(ValueError, match="tile_config"):
        mla_decode(q, kv, bt, lens, dv, tile_config=(24, 16, 4, 2))


@needs_triton
def test_dispatch(monkeypatch):
    q, kv, bt, lens, dv = _case(2, 1, 4, MICRO, 16, [5, 40], torch.float32)
    monkeypatch.delenv("LEANMOE_TRITON_INTERPRET", raising=False)
    ref = mla_decode(q, kv, bt, lens, dv, causal=True)
    monkeypatch.setenv("LEANMOE_TRITON_INTERPRET", "1")
    out = mla_decode(q, kv, bt, lens, dv, causal=True)
    _assert_matches(*out, *ref, torch.float32)
    with pytest.raises(ValueError, match="share a float dtype"):
        mla_decode(q.double(), kv.double(), bt, lens, dv)


class PagedLatentBackend:
    """A minimal paged latent cache: what an inference engine's decode backend does per layer."""

    def __init__(self, cfg, batch, max_len, block_size):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        per_seq = -(-max_len // block_size)
        self.kv = torch.zeros(n_layers, batch * per_seq + 1, block_size, 1, cfg.latent_dim)
        self.block_table = torch.randperm(batch * per_seq + 1)[: batch * per_seq].view(batch, per_seq).int()
        self.block_size, self.length = block_size, 0

    def attend(self, attn, q_nope, q_pe, kv_c, k_pe):
        b, t = q_nope.shape[:2]
        pos = torch.arange(self.length, self.length + t)
        blocks = self.block_table[:, pos // self.block_size].long()  # [B, T]
        self.kv[attn.layer_idx][blocks, pos % self.block_size, 0] = torch.cat([kv_c, k_pe], dim=-1)
        seqlens = torch.full((b,), self.length + t, dtype=torch.int32)
        return paged_mla_attend(attn, q_nope, q_pe, self.kv[attn.layer_idx], self.block_table, seqlens)


@pytest.mark.parametrize("path", ["cpu-kernel", "torch", pytest.param("triton", marks=needs_triton)])
def test_call_site_decodes_like_the_contiguous_cache(path, monkeypatch):
    if path == "triton":
        monkeypatch.setenv("LEANMOE_TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("LEANMOE_TRITON_INTERPRET", raising=False)
    if path == "torch":
        monkeypatch.setattr(mla_decode_module, "use_cpu_kernel", lambda *ts: False)
    model = Transformer(MICRO).eval()
    ids = torch.randint(0, MICRO.vocab_size, (2, 8))
    paged, contiguous = PagedLatentBackend(MICRO, 2, 8, block_size=3), LatentCache(MICRO, 2, 8)
    with torch.no_grad():
        for start, stop in ((0, 5), (5, 6), (6, 8)):  # a 5-token prefill, a decode step, a 2-token verify
            pos = torch.arange(start, stop)[None].expand(2, -1)
            got = model(ids[:, start:stop], pos, backend=paged)
            want = model(ids[:, start:stop], pos, backend=contiguous)
            paged.length += stop - start
            contiguous.advance(stop - start)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        full = model(ids)  # and both equal the uncached forward
    torch.testing.assert_close(got, full[:, -2:], rtol=1e-4, atol=1e-4)
    assert math.isfinite(got.sum().item())


def test_batched_torch_path_plan_is_made_once_per_step_and_changes_nothing():
    # one step's layers share the table and lengths: the first call makes the plan, the rest reuse it
    q, kv, bt, seqlens, dv = _case(3, 2, 4, MICRO, 5, [17, 3, 33], torch.float32)
    plans: dict = {}
    first = mla_decode_torch(q, kv, bt, seqlens, dv, 0.3, True, plans)
    assert len(plans) == 1
    (key, plan), = plans.items()
    again = mla_decode_torch(q * 2, kv, bt, seqlens, dv, 0.3, True, plans)
    assert len(plans) == 1 and plans[key] is plan
    for got, qq in ((first, q), (again, q * 2)):
        _assert_matches(*got, *mla_decode_reference(qq, kv, bt, seqlens, dv, 0.3, True), torch.float32)
