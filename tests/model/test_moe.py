import pytest
import torch

from leanmoe.model.moe import MoE, Router
from leanmoe.model.transformer import Transformer
from tests.util import micro_config


def _moe(**overrides) -> MoE:
    cfg = micro_config(**overrides)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def _loop_reference(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    x = x_BTD.reshape(-1, x_BTD.shape[-1])
    idx, w, _ = moe.gate(x)
    y = moe.experts.forward_reference(x, idx, w)
    return (y + moe.shared_experts(x)).view_as(x_BTD)


@pytest.mark.parametrize("overrides", [
    {},                                                           # groups, sigmoid, norm
    {"n_group": 1, "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False},
    {"num_experts_per_tok": 8, "n_group": 1, "topk_group": 1},    # top-k = all experts
    {"num_experts_per_tok": 1, "n_shared_experts": 2},
    {"hidden_size": 20, "moe_intermediate_size": 6},              # odd sizes: padded fallback
])
def test_grouped_gemm_moe_equals_per_expert_loop(overrides):
    moe = _moe(**overrides)
    x = torch.randn(2, 9, moe.gate.weight.shape[1], requires_grad=True)
    y, _ = moe(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    gx = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    y_ref = _loop_reference(moe, x)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_all_tokens_to_one_expert_and_single_token():
    moe = _moe(n_group=1, topk_group=1, num_experts_per_tok=1)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.fill_(-10.0)
        moe.gate.e_score_correction_bias[5] = 10.0  # bias forces expert 5 for everyone
    x = torch.randn(3, 5, 32)
    idx, _, _ = moe.gate(x.view(-1, 32))
    assert (idx == 5).all()
    torch.testing.assert_close(moe(x)[0], _loop_reference(moe, x), atol=1e-5, rtol=1e-5)
    one = torch.randn(1, 1, 32)
    torch.testing.assert_close(moe(one)[0], _loop_reference(moe, one), atol=1e-5, rtol=1e-5)


def test_bias_changes_selection_but_not_weights():
    router = _moe().gate
    x = torch.randn(64, 32)
    idx0, w0, scores = router(x)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 1.0)
    idx1, w1, scores1 = router(x)
    assert not torch.equal(idx0, idx1)  # selection moved
    torch.testing.assert_close(scores, scores1)
    # weights are the bias-free scores of the chosen experts, normalised and scaled
    expected = scores.gather(1, idx1)
    expected = expected / expected.sum(-1, keepdim=True) * router.routed_scaling_factor
    torch.testing.assert_close(w1, expected)


def test_groups_outside_topk_group_never_receive_tokens():
    router = _moe(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4).gate
    x = torch.randn(256, 32)
    idx, _, scores = router(x)
    groups_used = idx // 4  # experts per group = 4
    for t in range(x.shape[0]):
        assert len(set(groups_used[t].tolist())) <= 2
        # the chosen groups are the two with the largest sum of top-2 scores
        gs = scores[t].view(4, 4).topk(2, dim=-1).values.sum(-1)
        assert set(groups_used[t].tolist()) <= set(gs.topk(2).indices.tolist())


def test_softmax_group_score_is_group_max():
    router = _moe(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2, scoring_func="softmax",
                  norm_topk_prob=False).gate
    x = torch.randn(32, 32)
    idx, w, scores = router(x)
    best_group = scores.view(32, 4, 2).amax(-1).argmax(-1)
    assert torch.equal(idx // 2, best_group[:, None].expand(-1, 2))
    torch.testing.assert_close(w, scores.gather(1, idx) * router.routed_scaling_factor)


def test_bias_updates_reduce_imbalance_on_skewed_batch():
    torch.manual_seed(1)
    cfg = micro_config(n_group=1, topk_group=1, num_experts_per_tok=2, bias_update_speed=0.02)
    model = Transformer(cfg).train()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0, 0.02)
            moe.gate.e_score_correction_bias[0] = 0.5  # expert 0 starts out winning every token
    x = torch.randint(0, cfg.vocab_size, (4, 32))

    def imbalance():
        model.zero_grad()
        model.compute_loss(x, x)
        load = model.expert_load()
        return (load.max(dim=1).values / load.mean(dim=1)).mean().item()

    first = imbalance()
    model.update_router_bias()
    for _ in range(60):
        imbalance()
        model.update_router_bias()
    last = imbalance()
    assert first > 2.5, first
    assert last < 0.6 * first, (first, last)
    assert model.expert_load().sum() > 0
    model.update_router_bias()
    assert model.expert_load().sum() == 0  # counters reset


def test_update_bias_direction():
    moe = _moe()
    load = torch.tensor([10.0, 0, 4, 6, 5, 5, 5, 5])  # mean 5
    moe.update_bias(load, speed=0.1)
    b = moe.gate.e_score_correction_bias
    torch.testing.assert_close(b, torch.tensor([-0.1, 0.1, 0.1, -0.1, 0, 0, 0, 0]))
    moe.update_bias(torch.full((8,), 3.0), speed=0.1)  # balanced: no change
    torch.testing.assert_close(b, torch.tensor([-0.1, 0.1, 0.1, -0.1, 0, 0, 0, 0]))


def test_sequence_balance_loss_matches_formula():
    moe = _moe(aux_loss_alpha=0.01).train()
    x = torch.randn(2, 6, 32)
    _, aux = moe(x)
    e, k, t = 8, 3, 6
    expected = 0.0
    for b in range(2):
        idx, _, s = moe.gate(x[b])
        f = torch.bincount(idx.flatten(), minlength=e).float() * e / (k * t)
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += (f * p).sum() / 2
    torch.testing.assert_close(aux, 0.01 * expected)
    assert moe.eval()(x)[1] is None  # no balance loss (nor load counting) outside training
    assert _moe(aux_loss_alpha=0.0).train()(x)[1] is None


def test_router_is_fp32_and_bias_is_a_buffer():
    r = Router(micro_config())
    assert "e_score_correction_bias" in dict(r.named_buffers())
    assert "e_score_correction_bias" not in dict(r.named_parameters())
    idx, w, s = r.to(torch.bfloat16)(torch.randn(4, 32, dtype=torch.bfloat16))
    assert w.dtype == torch.float32 and s.dtype == torch.float32


@pytest.mark.parametrize("align", [3, 4, 64])
def test_aligned_expert_layout_equals_packed(align, monkeypatch):
    """Experts' rows padded to a multiple of `align` (the CPU bf16 path): same output and gradients."""
    from leanmoe.model import moe as moe_module

    moe = _moe(n_group=1, topk_group=1)
    x = torch.randn(3, 7, 32, requires_grad=True)
    x_ND = x.view(-1, 32)
    idx, w, _ = moe.gate(x_ND)
    w = w.detach().requires_grad_()  # a leaf: its gradient (through the weighted sum) is compared too
    counts = torch.bincount(idx.reshape(-1), minlength=moe.n_experts).to(torch.int32)
    g = torch.randn(x_ND.shape)
    results = []
    for a in (1, align):
        monkeypatch.setattr(moe_module, "expert_row_alignment", lambda x: a)
        x_PD, offs, order, row = moe.gather_rows(x_ND, idx, counts)
        assert (row is None) == (a == 1)
        if a > 1:  # every expert's rows padded to a multiple of a; each copy's row holds its token
            ends = offs.long()
            assert torch.all(torch.diff(ends, prepend=ends.new_zeros(1)) % a == 0)
            torch.testing.assert_close(x_PD[row], x_ND.detach().repeat_interleave(idx.shape[1], 0))
        y = moe.routed(x_ND, idx, w, counts)
        grads = torch.autograd.grad((y * g).sum(), [x, w] + list(moe.experts.parameters()))
        results.append((y, grads))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu_pads_expert_rows_and_matches_reference(monkeypatch):
    from leanmoe.kernels import grouped_gemm

    assert grouped_gemm.expert_row_alignment(torch.zeros(1)) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_gemm.expert_row_alignment(torch.zeros(1)) == grouped_gemm.CPU_ONEDNN_ROW_ALIGN
    assert grouped_gemm.expert_row_alignment(torch.zeros(1, dtype=torch.bfloat16)) == grouped_gemm.CPU_ONEDNN_ROW_ALIGN
    moe = _moe(n_group=1, topk_group=1)
    row_ends = []
    real = MoE.gather_rows
    monkeypatch.setattr(MoE, "gather_rows", lambda self, *a: (r := real(self, *a), row_ends.append(r[1]))[0])
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    assert len(row_ends) == 1 and int(row_ends[0][-1]) > 2 * 9 * moe.top_k  # padding rows were added
    assert torch.all(row_ends[0] % grouped_gemm.CPU_ONEDNN_ROW_ALIGN == 0)
    torch.testing.assert_close(y.float(), _loop_reference(moe, x), atol=0.1, rtol=0.05)


def _bf16_step(moe: MoE, x: torch.Tensor, g: torch.Tensor):
    """One bf16-autocast forward and backward of moe: (y fp32, gradients of x, the gate and the experts)."""
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(xi)
    return y.float(), torch.autograd.grad((y.float() * g).sum(), [xi, moe.gate.weight] + list(moe.experts.parameters()))


def _assert_bf16_close(result, reference):
    (y1, g1), (y0, g0) = result, reference
    torch.testing.assert_close(y1, y0, atol=0.02 * y0.abs().max().item(), rtol=0.05)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=0.02 * b.abs().max().item(), rtol=0.05)


def test_bf16_rows_kernels_match_the_torch_rows_in_a_training_step(monkeypatch):
    """The padded bf16 path's gather and combine by the C kernels (leanmoe.kernels.moe_rows) and by
    torch: the same output and gradients, up to bf16 rounding."""
    from leanmoe.kernels import moe_rows

    moe = _moe(n_group=1, topk_group=1)
    x, g = torch.randn(2, 40, 32), torch.randn(2, 40, 32)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(moe_rows, "rows_kernels_apply", lambda t, on=kernels: on)
        calls = []
        real = moe_rows.combine_rows
        monkeypatch.setattr(moe_rows, "combine_rows", lambda *a: (calls.append(1), real(*a))[1])
        results.append(_bf16_step(moe, x, g))
        assert len(calls) == int(kernels)
    _assert_bf16_close(*results)


def test_bf16_experts_kernel_matches_the_grouped_gemms_in_a_training_step(monkeypatch):
    """bf16 training's routed experts by the C kernel (leanmoe.kernels.experts_bf16) and by torch's
    grouped GEMMs on the same padded rows: the same output and gradients, up to bf16 rounding."""
    from leanmoe.kernels import experts_bf16

    moe = _moe(n_group=1, topk_group=1)
    x, g = torch.randn(2, 40, 32), torch.randn(2, 40, 32)
    real_applies, real_mlp = experts_bf16.experts_kernel_applies, experts_bf16.expert_mlp_bf16
    if not real_applies(torch.zeros(2, 32, dtype=torch.bfloat16), moe.experts.gate_up_proj, moe.experts.down_proj):
        pytest.skip("the C kernels are not built with AVX512-BF16 on this CPU")
    results = []
    for kernel in (True, False):
        calls = []
        monkeypatch.setattr(experts_bf16, "experts_kernel_applies", lambda *a, on=kernel: on and real_applies(*a))
        monkeypatch.setattr(experts_bf16, "expert_mlp_bf16", lambda *a: (calls.append(1), real_mlp(*a))[1])
        results.append(_bf16_step(moe, x, g))
        assert len(calls) == int(kernel)
    _assert_bf16_close(*results)
