import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton kernels run on CPU

import pytest
import torch

from leanmoe.kernels import dispatch
from leanmoe.kernels.fp8 import per_block_cast_to_fp8, per_token_cast_to_fp8
from leanmoe.kernels.fp8_gemm import (calc_diff, contiguous_layout, fp8_gemm_nt, grouped_mm_contiguous,
                                      grouped_mm_wgrad_contiguous, k_grouped_fp8_gemm_nt_contiguous,
                                      k_grouped_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_contiguous,
                                      m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from leanmoe.kernels.grouped_gemm import grouped_mm_reference

needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="triton is not installed")

BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]

# DeepGEMM's bound for FP8 operands against the unquantised product (bf16 output)
FP8_DIFF = 1e-3


def _both(fn, *args, **kwargs):
    """(Triton result, reference result) of one dispatch call."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LEANMOE_TRITON_INTERPRET", "1")
    out = fn(*args, **kwargs)
    mp.delenv("LEANMOE_TRITON_INTERPRET")
    ref = fn(*args, **kwargs)
    mp.undo()
    return out, ref


def _stack(pairs):
    return torch.stack([p for p, _ in pairs]), torch.stack([s for _, s in pairs])


def _block_cast_groups(w):
    return per_block_cast_to_fp8(w)  # [G, N, K] -> per-matrix blocks


# DeepSeek-V3's dense GEMMs (N, K) at decode-sized M, plus odd shapes (K, N, M not multiples of 128)
V3_NK = [(2112, 7168), (24576, 1536), (7168, 2048)]
ODD = [(1, 7, 5), (7, 300, 200), (129, 130, 257)]


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("n,k", V3_NK)
def test_fp8_gemm_deepseek_v3_shapes_triton(n, k, monkeypatch):
    m = 16
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    qa, qb = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)  # torch casts: only the GEMM interpreted
    monkeypatch.setenv("LEANMOE_TRITON_INTERPRET", "1")
    out = fp8_gemm_nt(qa, qb)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    diff = calc_diff(out, a.float() @ b.float().T)
    assert diff < FP8_DIFF, diff


@pytest.mark.parametrize("n,k", V3_NK)
def test_fp8_gemm_deepseek_v3_shapes_reference(n, k, monkeypatch):
    monkeypatch.delenv("LEANMOE_TRITON_INTERPRET", raising=False)
    a, b = torch.randn(4, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16)
    diff = calc_diff(fp8_gemm_nt(per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)), a.float() @ b.float().T)
    assert diff < FP8_DIFF, diff


@needs_triton
@pytest.mark.parametrize("m,n,k", ODD)
@pytest.mark.parametrize("block_n", [128, 512])
def test_fp8_gemm_triton_matches_reference(m, n, k, block_n):
    tile = (128, block_n, 8, 3)  # block_m stays the default (<= 128); block_n 128 is the GPU tile width, too
    a, b = torch.randn(m, k), torch.randn(n, k)
    qa, qb = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)
    out, ref = _both(fp8_gemm_nt, qa, qb, out_dtype=torch.float32, tile_config=tile)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    assert calc_diff(out, a @ b.T) < FP8_DIFF


@needs_triton
@pytest.mark.parametrize("split_k", [2, 4, 7])
def test_fp8_gemm_split_k_matches_reference(split_k):
    # K = 700: 6 steps of 128 (the last partial); 4 splits of 2 steps leave the last program empty, 7 leave one
    a, b = torch.randn(5, 700), torch.randn(130, 700)
    qa, qb = per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)
    out, ref = _both(fp8_gemm_nt, qa, qb, out_dtype=torch.float32, split_k=split_k)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    qb_rows = per_token_cast_to_fp8(b)  # 1x128 b tiles (weight gradients), bf16 out
    out, ref = _both(fp8_gemm_nt, qa, qb_rows, split_k=split_k)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_fp8_gemm_split_k_errors():
    qa, qb = per_token_cast_to_fp8(torch.randn(4, 256)), per_block_cast_to_fp8(torch.randn(128, 256))
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="split_k"):
            fp8_gemm_nt(qa, qb, split_k=bad)
    with pytest.raises(ValueError, match="split_k is an option of the Triton kernel"):
        fp8_gemm_nt(qa, qb, split_k=2, backend="cublas")


@needs_triton
def test_fp8_gemm_per_row_b_scales_and_bf16_out():
    # the weight-gradient form: both operands with 1x128 tiles (b scales [N, Kb])
    a, b = torch.randn(40, 300), torch.randn(70, 300)
    out, ref = _both(fp8_gemm_nt, per_token_cast_to_fp8(a), per_token_cast_to_fp8(b))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert calc_diff(out, a @ b.T) < FP8_DIFF


def _contiguous_case(counts, n, k, dtype=torch.float32):
    g = len(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    m = sum(counts)
    pos, m_indices, k_ends = contiguous_layout(offs, m)
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(g, n, k, dtype=dtype)
    x_pad = x.new_zeros(m_indices.shape[0], k).index_copy(0, pos, x)
    group = torch.repeat_interleave(torch.arange(g), torch.tensor(counts))
    return x, w, x_pad, pos, m_indices, k_ends, group


GROUP_CASES = [([5, 0, 130, 17], 200, 300), ([0, 0, 3], 64, 128), ([1], 7, 5)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("counts,n,k", GROUP_CASES)
def test_m_grouped_contiguous(counts, n, k, backend):
    x, w, x_pad, pos, m_indices, _, group = _contiguous_case(counts, n, k)
    out = m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(x_pad), _block_cast_groups(w), m_indices)
    assert out.shape == (m_indices.shape[0], n) and out.dtype == torch.bfloat16
    assert (out[m_indices < 0] == 0).all()  # padding rows skipped, written as zeros
    if x.shape[0]:
        ref = torch.einsum("mk,mnk->mn", x, w[group])
        assert calc_diff(out[pos], ref) < FP8_DIFF


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("counts,n,k", GROUP_CASES)
def test_m_grouped_bf16_contiguous(counts, n, k, backend):
    x, w, x_pad, pos, m_indices, _, group = _contiguous_case(counts, n, k, torch.bfloat16)
    out = m_grouped_bf16_gemm_nt_contiguous(x_pad, w, m_indices)
    assert out.dtype == torch.bfloat16 and (out[m_indices < 0] == 0).all()
    ref = torch.einsum("mk,mnk->mn", x.float(), w.float()[group])
    torch.testing.assert_close(out[pos].float(), ref, rtol=1e-2, atol=1e-2 * k ** 0.5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_m_grouped_masked(backend):
    g, m, n, k = 4, 48, 200, 300
    a = torch.randn(g, m, k, dtype=torch.bfloat16)
    w = torch.randn(g, n, k, dtype=torch.bfloat16)
    masked_m = torch.tensor([3, 0, m, 40], dtype=torch.int32)
    qa = _stack([per_token_cast_to_fp8(a[i]) for i in range(g)])
    out = m_grouped_fp8_gemm_nt_masked(qa, _block_cast_groups(w), masked_m, expected_m=24)
    assert out.shape == (g, m, n) and out.dtype == torch.bfloat16
    ref = torch.bmm(a.float(), w.float().transpose(1, 2))
    for i, valid in enumerate(masked_m.tolist()):
        assert (out[i, valid:] == 0).all()
        if valid:
            assert calc_diff(out[i, :valid], ref[i, :valid]) < FP8_DIFF, i


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("counts,n,k", GROUP_CASES)
def test_k_grouped_weight_gradient(counts, n, k, backend):
    # dW[g] = dy_g^T x_g with tokens as the reduction axis, quantised along tokens
    x, _, x_pad, pos, m_indices, k_ends, group = _contiguous_case(counts, n, k)
    dy = torch.randn(x.shape[0], n)
    dy_pad = dy.new_zeros(m_indices.shape[0], n).index_copy(0, pos, dy)
    out = k_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(dy_pad.t()), per_token_cast_to_fp8(x_pad.t()), k_ends)
    assert out.shape == (len(counts), n, k) and out.dtype == torch.float32
    for g, c in enumerate(counts):
        ref = dy[group == g].T @ x[group == g]
        if c:
            assert calc_diff(out[g], ref) < FP8_DIFF, g
        else:
            assert (out[g] == 0).all()
    plain = k_grouped_gemm_nt_contiguous(dy_pad.t().contiguous(), x_pad.t().contiguous(), k_ends)
    for g in range(len(counts)):
        torch.testing.assert_close(plain[g], dy[group == g].T @ x[group == g], rtol=1e-4, atol=1e-3)


@needs_triton
def test_grouped_triton_matches_reference():
    x, w, x_pad, pos, m_indices, k_ends, _ = _contiguous_case([5, 0, 130, 17], 200, 300)
    qa, qw = per_token_cast_to_fp8(x_pad), _block_cast_groups(w)
    out, ref = _both(m_grouped_fp8_gemm_nt_contiguous, qa, qw, m_indices, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    a, b = per_token_cast_to_fp8(x_pad.t()), per_token_cast_to_fp8(torch.randn_like(x_pad).t())
    out, ref = _both(k_grouped_fp8_gemm_nt_contiguous, a, b, k_ends)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("counts", [[4, 0, 7, 5], [0, 0, 9], [1], [0, 0]])
def test_grouped_mm_contract_on_the_bf16_kernels(counts, backend):
    # what leanmoe.kernels.grouped_gemm can call on GPUs without torch._grouped_mm
    x, w = torch.randn(sum(counts), 48).bfloat16(), torch.randn(len(counts), 20, 48).bfloat16()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    w_GKN = w.transpose(1, 2)  # leanmoe stores [G, N, K] and passes the transposed view
    ref = grouped_mm_reference(x.float(), w_GKN.float(), offs)
    torch.testing.assert_close(grouped_mm_contiguous(x, w_GKN, offs).float(), ref, rtol=1e-2, atol=5e-2)
    dy = torch.randn(sum(counts), 20).bfloat16()
    dw = grouped_mm_wgrad_contiguous(x, dy, offs)
    ends, starts = offs.tolist(), [0] + offs.tolist()[:-1]
    ref_dw = torch.stack([x[s:e].float().T @ dy[s:e].float() for s, e in zip(starts, ends)])
    assert dw.shape == (len(counts), 48, 20) and dw.dtype == torch.bfloat16
    torch.testing.assert_close(dw.float(), ref_dw, rtol=1e-2, atol=5e-2)


def test_contiguous_layout():
    counts = [5, 0, 130, 17]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    pos, m_indices, k_ends = contiguous_layout(offs, sum(counts))
    assert m_indices.shape[0] % 128 == 0 and m_indices.shape[0] >= sum(counts) + 127 * 4 - 127
    assert k_ends.tolist() == [128, 128, 384, 512]
    group = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    assert torch.equal(m_indices[pos].long(), group)
    assert (m_indices >= 0).sum() == sum(counts)
    starts = torch.tensor([0, 128, 128, 384])
    assert torch.equal(pos, starts[group] + torch.cat([torch.arange(c) for c in counts]))


def test_errors():
    a = per_token_cast_to_fp8(torch.randn(4, 256))
    with pytest.raises(ValueError, match="same K"):
        fp8_gemm_nt(a, per_block_cast_to_fp8(torch.randn(8, 128)))
    with pytest.raises(ValueError, match="K-major"):
        fp8_gemm_nt(a, (per_block_cast_to_fp8(torch.randn(256, 8))[0].t(), torch.ones(1, 2)))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm_nt((torch.randn(4, 256), a[1]), per_block_cast_to_fp8(torch.randn(8, 256)))
    with pytest.raises(ValueError, match="b scales"):
        fp8_gemm_nt(a, (per_block_cast_to_fp8(torch.randn(8, 256))[0], torch.ones(3, 2)))
    with pytest.raises(ValueError, match="m_indices must be an int tensor"):
        m_grouped_bf16_gemm_nt_contiguous(torch.randn(100, 8), torch.randn(2, 4, 8), torch.zeros(100))
    with pytest.raises(ValueError, match="k_ends must be an int tensor"):
        k_grouped_gemm_nt_contiguous(torch.randn(4, 8), torch.randn(3, 8), torch.tensor([[8]]))
    with pytest.raises(ValueError, match="masked_m must be an int tensor"):
        q = per_token_cast_to_fp8(torch.randn(4, 128))
        m_grouped_fp8_gemm_nt_masked((q[0][None], q[1][None]), _block_cast_groups(torch.randn(1, 8, 128)),
                                     torch.tensor([2.0]))


# Layouts DeepGEMM requires aligned: the kernel and the reference must agree on them too (they
# once did not: a group sharing a 128-row tile came back as zeros, and a K range starting
# mid-tile was scaled with its neighbour's scale, on the Triton path only).
UNALIGNED_M = [
    [0] * 5 + [1] * 7 + [2] * 3,                         # three groups in one tile, M not a multiple of 128
    [1] * 60 + [0] * 100 + [-1] * 8 + [2] * 90,          # groups straddling tiles, out of order, padding inside
    [2, 0, -1, 1, 7, 0, 2, -3] * 20,                     # unsorted; ids past G and below -1 are padding
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("ids", UNALIGNED_M, ids=["one-tile", "straddling", "unsorted"])
def test_m_grouped_contiguous_any_layout(ids, backend):
    g, n, k = 3, 40, 200
    m_indices = torch.tensor(ids, dtype=torch.int32)
    x, w = torch.randn(len(ids), k), torch.randn(g, n, k)
    valid = (m_indices >= 0) & (m_indices < g)
    ref = torch.einsum("mk,mnk->mn", x, w[m_indices.clamp(0, g - 1).long()]) * valid[:, None]
    out = m_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(x), _block_cast_groups(w), m_indices,
                                           out_dtype=torch.float32)
    assert (out[~valid] == 0).all()
    assert calc_diff(out, ref) < FP8_DIFF
    outb = m_grouped_bf16_gemm_nt_contiguous(x.bfloat16(), w.bfloat16(), m_indices)
    assert (outb[~valid] == 0).all()
    torch.testing.assert_close(outb.float(), ref, rtol=2e-2, atol=2e-2 * k ** 0.5)


@needs_triton
@pytest.mark.parametrize("ids", UNALIGNED_M, ids=["one-tile", "straddling", "unsorted"])
def test_m_grouped_contiguous_any_layout_triton_matches_reference(ids):
    m_indices = torch.tensor(ids, dtype=torch.int32)
    x, w = torch.randn(len(ids), 200), torch.randn(3, 40, 200)
    out, ref = _both(m_grouped_fp8_gemm_nt_contiguous, per_token_cast_to_fp8(x), _block_cast_groups(w), m_indices,
                     out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


# inclusive ends over T = 384 tokens: ranges starting mid-tile, an empty one, one reversed, one past T
K_ENDS = [[100, 300, 384], [0, 129, 129, 250, 384], [200, 150, 500]]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("ends", K_ENDS)
def test_k_grouped_any_ranges(ends, backend):
    t, m, n = 384, 24, 40
    a, b = torch.randn(m, t), torch.randn(n, t)
    k_ends = torch.tensor(ends, dtype=torch.int32)
    out = k_grouped_fp8_gemm_nt_contiguous(per_token_cast_to_fp8(a), per_token_cast_to_fp8(b), k_ends)
    plain = k_grouped_gemm_nt_contiguous(a, b, k_ends)
    lo = 0
    for g, hi in enumerate(min(e, t) for e in ends):
        ref = a[:, lo:hi] @ b[:, lo:hi].T if hi > lo else torch.zeros(m, n)
        if hi > lo:
            assert calc_diff(out[g], ref) < FP8_DIFF, g
        else:
            assert (out[g] == 0).all(), g
        torch.testing.assert_close(plain[g], ref, rtol=1e-4, atol=1e-3)
        lo = hi


@needs_triton
@pytest.mark.parametrize("ends", K_ENDS)
def test_k_grouped_any_ranges_triton_matches_reference(ends):
    a, b = per_token_cast_to_fp8(torch.randn(24, 384)), per_token_cast_to_fp8(torch.randn(40, 384))
    out, ref = _both(k_grouped_fp8_gemm_nt_contiguous, a, b, torch.tensor(ends, dtype=torch.int32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_compiles():
    a, b = torch.randn(8, 200), torch.randn(16, 200)
    f = torch.compile(lambda x, y: fp8_gemm_nt(per_token_cast_to_fp8(x), per_block_cast_to_fp8(y)),
                      backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(a, b), fp8_gemm_nt(per_token_cast_to_fp8(a), per_block_cast_to_fp8(b)))
