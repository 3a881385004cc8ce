import itertools
import math

import pytest
import torch
from torch import nn

from leanmoe.model.layers import RMSNorm
from leanmoe.train.config import SCHEDULES
from leanmoe.train.optim import build_optimizer, lr_at

PEAK = 1e-3


# ---------------------------------------------------------------------------- warm-up
@pytest.mark.parametrize("schedule", SCHEDULES)  # every name the config and the CLI accept
def test_warmup_is_linear_in_the_step_and_ignores_progress(schedule):
    # step s (0-based) of W warm-up steps gets peak * (s + 1) / W, whatever the budget progress
    for progress in (0.0, 0.5, 1.0):
        lrs = [lr_at(s, progress, PEAK, 4, schedule) for s in range(4)]
        torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64),
                                   torch.tensor([0.25e-3, 0.5e-3, 0.75e-3, 1e-3], dtype=torch.float64),
                                   rtol=1e-12, atol=0)


def test_an_unknown_schedule_is_named_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown schedule 'linear'; use one of cosine, wsd, constant"):
        lr_at(10, 0.5, PEAK, 1, "linear")


def test_warmup_of_one_step_starts_at_peak():
    assert lr_at(0, 0.0, PEAK, 1) == pytest.approx(PEAK, rel=1e-12)
    # warm-up 0 skips straight to the schedule
    assert lr_at(0, 0.0, PEAK, 0) == pytest.approx(PEAK, rel=1e-12)


def test_warmup_takes_precedence_over_a_finished_budget():
    # progress 1 during warm-up does not drop the lr to the floor
    assert lr_at(1, 1.0, PEAK, 10, "cosine") == pytest.approx(PEAK * 2 / 10, rel=1e-12)


# ---------------------------------------------------------------------------- cosine
def test_cosine_goes_from_peak_to_floor():
    floor = PEAK * 0.1
    assert lr_at(5, 0.0, PEAK, 1, "cosine") == pytest.approx(PEAK, rel=1e-12)
    assert lr_at(5, 1.0, PEAK, 1, "cosine") == pytest.approx(floor, rel=1e-12)
    assert lr_at(5, 0.5, PEAK, 1, "cosine") == pytest.approx((PEAK + floor) / 2, rel=1e-12)
    p = 0.3
    expected = floor + (PEAK - floor) * 0.5 * (1 + math.cos(math.pi * p))
    assert lr_at(5, p, PEAK, 1, "cosine") == pytest.approx(expected, rel=1e-12)


def test_cosine_is_monotone_and_clamps_progress():
    lrs = [lr_at(10, p / 20, PEAK, 1, "cosine") for p in range(21)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    # progress outside [0, 1] is clamped (time budgets overshoot a little)
    assert lr_at(10, -0.5, PEAK, 1, "cosine") == pytest.approx(PEAK, rel=1e-12)
    assert lr_at(10, 1.7, PEAK, 1, "cosine") == pytest.approx(0.1 * PEAK, rel=1e-12)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_min_lr_ratio_sets_the_floor(ratio):
    assert lr_at(10, 1.0, PEAK, 1, "cosine", min_lr_ratio=ratio) == pytest.approx(PEAK * ratio, rel=1e-12, abs=1e-18)
    assert lr_at(10, 1.0, PEAK, 1, "wsd", min_lr_ratio=ratio) == pytest.approx(PEAK * ratio, rel=1e-12, abs=1e-18)


# ---------------------------------------------------------------------------- wsd
def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    floor = 0.1 * PEAK
    kw = {"schedule": "wsd", "min_lr_ratio": 0.1, "decay_fraction": 0.2}
    for p in (0.0, 0.3, 0.79, 0.8):  # stable up to and including 1 - decay_fraction
        assert lr_at(10, p, PEAK, 1, **kw) == PEAK
    assert lr_at(10, 0.9, PEAK, 1, **kw) == pytest.approx((PEAK + floor) / 2, rel=1e-9)
    assert lr_at(10, 0.85, PEAK, 1, **kw) == pytest.approx(PEAK - (PEAK - floor) * 0.25, rel=1e-9)
    assert lr_at(10, 1.0, PEAK, 1, **kw) == pytest.approx(floor, rel=1e-9)
    # linear: equal progress steps give equal lr steps inside the decay
    a, b, c = (lr_at(10, p, PEAK, 1, **kw) for p in (0.82, 0.88, 0.94))
    assert a - b == pytest.approx(b - c, rel=1e-9)


def test_wsd_decay_fraction_one_decays_from_the_start_and_zero_never_decays():
    assert lr_at(10, 0.5, PEAK, 1, "wsd", decay_fraction=1.0) == pytest.approx(PEAK - 0.9 * PEAK * 0.5, rel=1e-9)
    # decay_fraction 0: stable at peak up to progress 1 inclusive (no division by zero)
    assert lr_at(10, 0.999, PEAK, 1, "wsd", decay_fraction=0.0) == PEAK
    assert lr_at(10, 1.0, PEAK, 1, "wsd", decay_fraction=0.0) == PEAK


# ---------------------------------------------------------------------------- constant and errors
def test_constant_stays_at_peak():
    for p in (0.0, 0.5, 1.0):
        assert lr_at(100, p, PEAK, 5, "constant") == PEAK


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(10, 0.5, PEAK, 1, "linear")
    # during warm-up the schedule is not consulted yet
    assert lr_at(0, 0.5, PEAK, 2, "linear") == pytest.approx(PEAK / 2, rel=1e-12)


# ---------------------------------------------------------------------------- build_optimizer
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 6, bias=True)
        self.norm = RMSNorm(6)
        self.out = nn.Linear(6, 10, bias=False)
        self.frozen = nn.Linear(6, 6, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.register_buffer("router_bias", torch.zeros(3))  # a buffer: never optimised


def _ids(params):
    return {id(p) for p in params}


def test_weight_decay_on_matrices_only():
    model = _Tiny()
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.05, betas=(0.8, 0.9), eps=1e-7)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([model.emb.weight, model.proj.weight, model.out.weight])
    assert _ids(no_decay["params"]) == _ids([model.proj.bias, model.norm.weight])
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7
    # frozen parameters and buffers are not handed to the optimizer
    everything = _ids(decay["params"]) | _ids(no_decay["params"])
    assert id(model.frozen.weight) not in everything and id(model.router_bias) not in everything


def test_defaults_are_deepseek_v3s_and_tied_weights_appear_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one tensor, two modules
    opt = build_optimizer(model, lr=1e-3)
    decay, no_decay = opt.param_groups
    assert len(decay["params"]) == 1 and no_decay["params"] == []
    assert decay["weight_decay"] == 0.1 and decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults.get("fused")  # torch's fused kernel runs on CPUs too


def test_fused_steps_match_the_per_tensor_adamw():
    # the fused kernel against the plain loop it replaces, over a few steps with changing lr and
    # every group kind (decay, no decay, an expert group with its own lr)
    from leanmoe import Transformer
    from tests.util import micro_config

    torch.manual_seed(0)
    model = Transformer(micro_config())
    twin = Transformer(micro_config())
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, lr=1e-2, expert_lr_scale=2.0)
    loop = build_optimizer(twin, lr=1e-2, expert_lr_scale=2.0)
    assert fused.defaults["fused"]
    for group in loop.param_groups:
        group["fused"], group["foreach"] = False, False
    for step in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for opt, m in ((fused, model), (loop, twin)):
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1) * group.get("lr_scale", 1.0)
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_only_matrices_shrink_under_weight_decay_with_zero_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=True), RMSNorm(3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    w, b, g = model.parameters()
    # AdamW decoupled decay: w <- w * (1 - lr * wd) when the gradient is zero
    torch.testing.assert_close(w.detach(), before[0] * (1 - 0.1 * 0.5), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach(), before[1], rtol=0, atol=0)
    torch.testing.assert_close(g.detach(), before[2], rtol=0, atol=0)


def test_expert_lr_scale_puts_the_routed_experts_in_their_own_group():
    from leanmoe import Transformer
    from tests.util import micro_config

    model = Transformer(micro_config())
    expert_params = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    assert expert_params
    plain = build_optimizer(model, lr=1e-3)
    assert len(plain.param_groups) == 2  # scale 1: no group of their own
    opt = build_optimizer(model, lr=1e-3, expert_lr_scale=4.0)
    decay, no_decay, experts = opt.param_groups
    assert {id(p) for p in experts["params"]} == expert_params  # routed only: not the shared experts
    assert experts["lr_scale"] == 4.0 and experts["lr"] == pytest.approx(4e-3) and experts["weight_decay"] == 0.1
    others = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert not others & expert_params and len(others) + len(expert_params) == len(list(model.parameters()))
