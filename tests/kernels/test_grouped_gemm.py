import pytest
import torch

from leanmoe.kernels.grouped_gemm import grouped_mm, grouped_mm_backend, grouped_mm_reference


def _offsets(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


CASES = [
    ([4, 0, 7, 5], 16, 32),   # aligned strides (torch._grouped_mm on CPU), one empty group
    ([3, 3, 1], 6, 5),        # odd sizes: padded bmm
    ([0, 0, 9], 8, 8),        # everything in the last group
    ([1], 4, 12),             # one group, one row
    ([0, 0], 8, 8),           # no rows at all
]


@pytest.mark.parametrize("counts,k,n", CASES)
def test_matches_reference_forward_and_backward(counts, k, n):
    m = sum(counts)
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(len(counts), n, k, requires_grad=True)  # stored [G, N, K]; used transposed
    offs = _offsets(counts)
    y = grouped_mm(x, w.transpose(1, 2), offs)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = grouped_mm_reference(x2, w2.transpose(1, 2), offs)
    (y2 * dy).sum().backward()
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    if m:
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad if w2.grad is not None else torch.zeros_like(w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("counts,k,n", CASES)
def test_without_autograd_matches_reference_and_skips_the_custom_op(counts, k, n, monkeypatch):
    # inference calls the implementation directly; with gradients wanted it must go through the op
    from leanmoe.kernels import grouped_gemm

    x, w, offs = torch.randn(sum(counts), k), torch.randn(len(counts), n, k), _offsets(counts)
    ref = grouped_mm_reference(x, w.transpose(1, 2), offs)
    calls = []
    real = grouped_gemm._grouped_mm_op
    monkeypatch.setattr(grouped_gemm, "_grouped_mm_op", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        torch.testing.assert_close(grouped_mm(x, w.transpose(1, 2), offs), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(grouped_mm(x.requires_grad_(), w.transpose(1, 2), offs), ref, atol=1e-5, rtol=1e-5)
    assert calls == []
    grouped_mm(x, w.transpose(1, 2), offs)  # x wants a gradient
    assert calls == [1]


def test_sum_backward_with_stride_zero_gradient():
    x = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(2, 16, 16, requires_grad=True)
    grouped_mm(x, w, _offsets([10, 22])).sum().backward()
    torch.testing.assert_close(x.grad[:10], w[0].sum(1).expand(10, 16).detach())


def test_gradcheck_float64():
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(grouped_mm, (x, w, _offsets([2, 0, 5])))


def test_bf16_close_to_fp32():
    x, w = torch.randn(64, 32), torch.randn(4, 32, 48)
    offs = _offsets([16, 8, 30, 10])
    ref = grouped_mm_reference(x, w, offs)
    out = grouped_mm(x.bfloat16(), w.bfloat16(), offs).float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


def test_backend_reported_and_errors():
    assert grouped_mm_backend("cpu", torch.float32) in ("torch._grouped_mm", "padded_bmm")
    with pytest.raises(ValueError, match="expected x"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 4, 5), _offsets([2, 2]))
    with pytest.raises(ValueError, match="one entry per group"):
        grouped_mm(torch.randn(4, 3), torch.randn(2, 3, 5), _offsets([4]))


def test_compiles():
    x, w = torch.randn(32, 16, requires_grad=True), torch.randn(3, 16, 8, requires_grad=True)
    offs = _offsets([10, 0, 22])
    f = torch.compile(lambda a, b: grouped_mm(a, b, offs).square().sum(), backend="aot_eager", fullgraph=True)
    f(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    grouped_mm_reference(x, w, offs).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


# ---------------------------------------------------------------------- the experts' whole MLP (C kernel)
from leanmoe.kernels import grouped_gemm as grouped_gemm_module  # noqa: E402
from leanmoe.kernels.grouped_gemm import expert_mlp, expert_mlp_cpu, expert_mlp_reference  # noqa: E402

MLP_CASES = [
    ([4, 0, 7, 5], 16, 8),     # an empty expert in the middle; rows not a multiple of four
    ([3, 3, 1], 6, 5),         # odd widths (no SIMD-sized rows)
    ([0, 0, 9], 32, 48),       # everything in the last expert
    ([1], 4, 12),              # one expert, one row
    ([0, 0], 8, 8),            # no rows at all
    ([2, 1, 0, 3, 2, 0, 1, 1], 256, 128),  # a decode step of bench/serve_vs_vllm.py's model
]


def _expert_weights(e, d, f):
    return torch.randn(e, 2 * f, d) / d**0.5, torch.randn(e, d, f) / f**0.5


@pytest.mark.parametrize("counts,d,f", MLP_CASES)
def test_expert_mlp_cpu_matches_reference(counts, d, f):
    x = torch.randn(sum(counts), d)
    w1, w2 = _expert_weights(len(counts), d, f)
    offs = _offsets(counts)
    want = expert_mlp_reference(x, w1, w2, offs)
    torch.testing.assert_close(expert_mlp_cpu(x, w1, w2, offs), want, rtol=1e-5, atol=1e-5)
    # strided views are copied, not misread
    torch.testing.assert_close(expert_mlp_cpu(torch.cat([x, x], 1)[:, :d], w1.transpose(1, 2).contiguous()
                                              .transpose(1, 2), w2, offs), want, rtol=1e-5, atol=1e-5)


def test_expert_mlp_cpu_same_result_at_any_thread_count():
    counts = [5, 0, 9, 2, 7, 1, 0, 3]
    x = torch.randn(sum(counts), 64)
    w1, w2 = _expert_weights(8, 64, 32)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(expert_mlp_cpu(x, w1, w2, _offsets(counts)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_expert_mlp_cpu_refuses_what_it_does_not_handle():
    x = torch.randn(6, 8)
    w1, w2 = _expert_weights(3, 8, 4)
    with pytest.raises(ValueError, match="must be nondecreasing row ends with offs\\[-1\\] == 6"):
        expert_mlp_cpu(x, w1, w2, torch.tensor([2, 1, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="must be nondecreasing"):
        expert_mlp_cpu(x, w1, w2, torch.tensor([2, 4, 5], dtype=torch.int32))  # a row left over
    with pytest.raises(ValueError, match="expected x \\[M, D\\], w1 \\[E, 2F, D\\]"):
        expert_mlp_cpu(x, w1[:, :7], w2, _offsets([2, 2, 2]))
    with pytest.raises(RuntimeError, match="fp32 CPU tensors"):
        expert_mlp_cpu(x.double(), w1.double(), w2.double(), _offsets([2, 2, 2]))


def test_expert_mlp_dispatch(monkeypatch):
    """The C kernel for inference at few rows per expert; grouped GEMMs with a gradient or many rows."""
    called = []
    real = grouped_gemm_module.expert_mlp_cpu
    monkeypatch.setattr(grouped_gemm_module, "expert_mlp_cpu", lambda *a: called.append("C") or real(*a))
    w1, w2 = _expert_weights(4, 16, 8)
    few = torch.randn(4 * grouped_gemm_module.CPU_EXPERTS_MAX_ROWS, 16)
    many = torch.randn(few.shape[0] + 1, 16)
    for x in (few, many):
        offs = _offsets([x.shape[0] - 3, 1, 1, 1])
        with torch.no_grad():
            torch.testing.assert_close(expert_mlp(x, w1, w2, offs), expert_mlp_reference(x, w1, w2, offs))
        called.append("|")
    assert called == ["C", "|", "|"]
    xg = few.clone().requires_grad_()
    expert_mlp(xg, w1, w2, _offsets([few.shape[0] - 3, 1, 1, 1])).sum().backward()  # differentiable: grouped GEMMs
    assert called == ["C", "|", "|"] and xg.grad is not None
