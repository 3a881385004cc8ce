"""The bf16 experts' C kernel (leanmoe/kernels/cpu_experts.c) against the grouped-GEMM reference,
forward and backward."""

import pytest
import torch

from leanmoe.kernels import experts_bf16
from leanmoe.kernels.grouped_gemm import expert_mlp_reference

needs_kernel = pytest.mark.skipif(experts_bf16._lib() is None,
                                  reason="the C kernels are not built with AVX512-BF16 on this CPU")


def _case(counts, d, f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    p, e = int(counts.sum()), len(counts)
    x = torch.randn(p, d, generator=gen).bfloat16()
    w1 = torch.randn(e, 2 * f, d, generator=gen) / d**0.5
    w2 = torch.randn(e, d, f, generator=gen) / f**0.5
    dy = torch.randn(p, d, generator=gen).bfloat16()
    return x, w1, w2, counts.cumsum(0).to(torch.int32), dy


def _reference(x, w1, w2, offs, dy):
    """fp32 math on the same bf16-rounded inputs: the kernel rounds h, a and the outputs to bf16."""
    xr = x.float().requires_grad_()
    w1r, w2r = w1.bfloat16().float().requires_grad_(), w2.bfloat16().float().requires_grad_()
    y = expert_mlp_reference(xr, w1r, w2r, offs)
    y.backward(dy.float())
    return y, xr.grad, w1r.grad, w2r.grad


def _close(a, b, rel):
    err = (a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)
    assert err < rel, f"relative error {err:.2e}"


@needs_kernel
@pytest.mark.parametrize("counts,d,f", [
    ([64, 32, 0, 96], 32, 16),                 # padded groups and an empty expert
    ([7, 0, 13, 1, 64, 65, 3], 48, 16),        # odd groups: rows pair with zeros in the weight gradients
    ([530, 490, 560, 544], 256, 64),           # tiny's shapes, several row blocks per expert
    ([0, 0, 0], 16, 32),                       # no rows at all
])
def test_forward_and_gradients_match_the_grouped_gemms(counts, d, f):
    x, w1, w2, offs, dy = _case(counts, d, f)
    x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()
    y = experts_bf16.expert_mlp_bf16(x, w1, w2, offs)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.backward(dy)
    ref_y, ref_dx, ref_dw1, ref_dw2 = _reference(x.detach(), w1.detach(), w2.detach(), offs, dy)
    if x.shape[0] == 0:
        assert w1.grad.abs().sum() == 0 and w2.grad.abs().sum() == 0
        return
    assert x.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.float32 and w2.grad.dtype == torch.float32
    _close(y, ref_y, 8e-3)
    _close(x.grad, ref_dx, 1e-2)
    _close(w1.grad, ref_dw1, 1e-2)
    _close(w2.grad, ref_dw2, 1e-2)
    # an empty expert's weights get exact zeros
    for i in (j for j, c in enumerate(counts) if c == 0):
        assert w1.grad[i].abs().sum() == 0 and w2.grad[i].abs().sum() == 0


@needs_kernel
def test_each_expert_uses_only_its_own_weights():
    # rows of expert 1 changed nothing in expert 0's output and gradient
    x, w1, w2, offs, dy = _case([32, 32], 32, 16, seed=3)
    y = experts_bf16.expert_mlp_bf16(x, w1, w2, offs)
    w1b, w2b = w1.clone(), w2.clone()
    w1b[1].mul_(3.0), w2b[1].mul_(-1.0)
    yb = experts_bf16.expert_mlp_bf16(x, w1b, w2b, offs)
    torch.testing.assert_close(y[:32], yb[:32], atol=0, rtol=0)
    assert not torch.equal(y[32:], yb[32:])


@needs_kernel
def test_gradients_only_where_asked():
    x, w1, w2, offs, dy = _case([32, 64], 32, 16)
    w1.requires_grad_(), w2.requires_grad_()
    y = experts_bf16.expert_mlp_bf16(x, w1, w2, offs)  # x needs no gradient: dx is skipped
    y.backward(dy)
    assert x.grad is None and w1.grad is not None and w2.grad is not None
    _, _, ref_dw1, _ = _reference(x, w1.detach(), w2.detach(), offs, dy)
    _close(w1.grad, ref_dw1, 1e-2)


@needs_kernel
def test_bad_offsets_and_shapes_are_refused():
    x, w1, w2, offs, _ = _case([32, 32], 32, 16)
    with pytest.raises(ValueError, match="nondecreasing"):
        experts_bf16.expert_mlp_bf16(x, w1, w2, torch.tensor([40, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match="nondecreasing"):
        experts_bf16.expert_mlp_bf16(x, w1, w2, torch.tensor([32, 60], dtype=torch.int32))
    with pytest.raises(ValueError, match="expected x"):
        experts_bf16.expert_mlp_bf16(x, w1, w2[:, :16], offs)
    with pytest.raises(ValueError, match="bf16 x and fp32 weights"):
        experts_bf16.expert_mlp_bf16(x.float(), w1, w2, offs)


def test_when_the_kernel_applies():
    x, w1, w2 = torch.zeros(4, 32).bfloat16(), torch.zeros(2, 32, 32), torch.zeros(2, 32, 16)
    built = experts_bf16._lib() is not None
    assert experts_bf16.experts_kernel_applies(x, w1, w2) == built
    assert not experts_bf16.experts_kernel_applies(x.float(), w1, w2)            # fp32 rows: torch's GEMMs
    assert not experts_bf16.experts_kernel_applies(x, w1.bfloat16(), w2.bfloat16())  # bf16 weights
    assert not experts_bf16.experts_kernel_applies(torch.zeros(4, 24).bfloat16(), torch.zeros(2, 32, 24),
                                                   torch.zeros(2, 24, 16))      # D not a multiple of 16
