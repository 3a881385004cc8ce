import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton kernels run on CPU

import pytest
import torch

from leanmoe.kernels import dispatch, fp8
from leanmoe.kernels.fp8 import (FP8_MAX, per_block_cast_to_fp8, per_block_cast_to_fp8_reference, per_block_dequant,
                                 per_token_cast_to_fp8, per_token_cast_to_fp8_reference, per_token_dequant)

needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="triton is not installed")



@pytest.fixture
def triton_path(monkeypatch):
    """Route the dispatch points to the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("LEANMOE_TRITON_INTERPRET", "1")


def _codes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # compare values, not bytes: the Triton rounding may turn -0 into +0 for tiny negatives
    return torch.equal(a.float(), b.float())


def _wide_range(m, k):
    """Rows spanning six decades, so tiles get very different scales."""
    return torch.randn(m, k) * torch.logspace(-3, 3, k)


SHAPES = [(1, 7), (5, 300), (128, 256), (130, 129), (3, 128)]


@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_reference_tiles_scales_and_error(m, k, use_ue8m0):
    x = _wide_range(m, k)
    xq, s = per_token_cast_to_fp8_reference(x, use_ue8m0)
    assert xq.shape == (m, k) and xq.dtype == torch.float8_e4m3fn and s.shape == (m, -(-k // 128))
    xp = torch.nn.functional.pad(x, (0, s.shape[1] * 128 - k)).view(m, -1, 128)
    amax = xp.abs().amax(-1).clamp(min=1e-4)
    if use_ue8m0:
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
        assert (s >= amax / FP8_MAX).all() and (s < 2 * amax / FP8_MAX).all()
    else:
        torch.testing.assert_close(s, amax / FP8_MAX, rtol=0, atol=0)
    assert xq.float().abs().max() <= FP8_MAX
    deq = per_token_dequant(xq, s)
    # E4M3 keeps 3 mantissa bits: every element within half an ulp (1/16 relative), or the
    # subnormal step (2^-9 * scale) for values small next to their tile's amax
    bound = torch.maximum(x.abs() / 16, (s.repeat_interleave(128, 1)[:, :k]) * 2.0 ** -10)
    assert ((deq - x).abs() <= bound * 1.0001).all()


@pytest.mark.parametrize("n,k", [(1, 7), (200, 130), (128, 128), (257, 300)])
def test_block_reference_and_transpose(n, k):
    w = torch.randn(n, k)
    wq, s = per_block_cast_to_fp8_reference(w)
    assert wq.shape == (n, k) and s.shape == (-(-n // 128), -(-k // 128))
    rel = (per_block_dequant(wq, s) - w).norm() / w.norm()
    assert rel < 0.04, rel
    wtq, st = per_block_cast_to_fp8_reference(w.t())  # 128x128 blocks are symmetric
    assert _codes_equal(wtq, wq.t()) and torch.equal(st, s.t())


def test_zero_tile_gets_the_floor_scale():
    x = torch.zeros(2, 256)
    x[1, 200] = 3.0
    xq, s = per_token_cast_to_fp8(x)
    assert torch.equal(s[0], torch.full((2,), 1e-4 / FP8_MAX))
    assert xq.float()[0].abs().sum() == 0 and xq.float()[1, 200] == FP8_MAX


def test_grouped_block_cast_is_per_matrix():
    w = torch.randn(3, 200, 130)
    wq, s = per_block_cast_to_fp8(w)
    assert s.shape == (3, 2, 2)
    for g in range(3):
        q, sg = per_block_cast_to_fp8_reference(w[g])
        assert _codes_equal(wq[g], q) and torch.equal(s[g], sg)


@needs_triton
@pytest.mark.parametrize("m,k", SHAPES)
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_triton_matches_reference(m, k, use_ue8m0, triton_path):
    x = _wide_range(m, k).bfloat16()
    for cast, ref in ((per_token_cast_to_fp8, per_token_cast_to_fp8_reference),
                      (per_block_cast_to_fp8, per_block_cast_to_fp8_reference)):
        (q, s), (rq, rs) = cast(x, use_ue8m0), ref(x, use_ue8m0)
        assert _codes_equal(q, rq), cast.__name__
        assert torch.equal(s, rs), cast.__name__


@needs_triton
def test_triton_strided_and_grouped(triton_path):
    x = torch.randn(300, 130)
    q, s = per_token_cast_to_fp8(x.t())  # quantise along the token axis without a copy
    rq, rs = per_token_cast_to_fp8_reference(x.t().contiguous())
    assert _codes_equal(q, rq) and torch.equal(s, rs)
    w = torch.randn(2, 150, 260)
    (q, s), (rq, rs) = per_block_cast_to_fp8(w.transpose(1, 2)), per_block_cast_to_fp8_reference(w.transpose(1, 2))
    assert _codes_equal(q, rq) and torch.equal(s, rs)


@needs_triton
def test_triton_rounds_every_e4m3_value_and_midpoint(triton_path):
    # all finite E4M3 magnitudes and the midpoints between neighbours (ties go to even)
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals) & (vals >= 0)].sort().values
    mids = (vals[1:] + vals[:-1]) / 2
    v = torch.cat([vals, mids, -vals, -mids])
    x = torch.stack([v, torch.full_like(v, FP8_MAX)], 1)  # one tile per row, amax pinned at 448
    q, _ = fp8.per_token_cast_triton(x)
    rq, _ = per_token_cast_to_fp8_reference(x)
    assert _codes_equal(q, rq)


def test_errors():
    with pytest.raises(ValueError, match="2-D float"):
        per_token_cast_to_fp8(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="float"):
        per_block_cast_to_fp8(torch.ones(4, 4, dtype=torch.int32))


def test_compiles():
    f = torch.compile(lambda t: per_token_dequant(*per_token_cast_to_fp8(t)), backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 200)
    torch.testing.assert_close(f(x), per_token_dequant(*per_token_cast_to_fp8_reference(x)), rtol=0, atol=0)
