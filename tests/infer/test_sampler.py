"""leanmoe/infer/sampler.py: filtering, seeds independent of batching, the speculative rule."""

import pytest
import torch

from leanmoe.infer.sampler import Sampler
from leanmoe.infer.sampling_params import SamplingParams


def test_params_validation():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(max_tokens=-1),
                dict(max_tokens=2.5), dict(stop=[""]), dict(seed="x"), dict(stop_token_ids=[-1]),
                dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(frequency_penalty=float("nan")),
                dict(presence_penalty="1"), dict(logit_bias={5: 101}), dict(logit_bias={-1: 1.0}),
                dict(logit_bias={"5": 1.0}), dict(logit_bias={5: True}), dict(logprobs=21), dict(logprobs=-1),
                dict(prompt_logprobs=1.5), dict(logprobs=True), dict(logit_bias=[(5, 1.0)])):
        field = next(iter(bad))
        with pytest.raises(ValueError, match=field):  # the message names the field
            SamplingParams(**bad)
    assert SamplingParams(stop="end").stop == ["end"]
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0  # score the prompt only
    assert not SamplingParams().adjusts_logits and SamplingParams(logit_bias={3: -100}).adjusts_logits


def test_adjust_applies_bias_and_penalties_like_openai():
    """logits[v] += bias[v] - frequency * count[v] - presence * (count[v] > 0), per row; rows that
    set nothing are unchanged, and a batch where no row does is returned as is."""
    logits = torch.randn(3, 10)
    plain = [SamplingParams()] * 3
    assert Sampler.adjust(logits, plain, [[1, 1], [], [2]]) is logits
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={9: -100.0, 1: 2.0}),
              SamplingParams(),
              SamplingParams(presence_penalty=-1.0)]
    outputs = [[1, 1, 4], [3, 3], []]
    got = Sampler.adjust(logits.half(), params, outputs)
    want = logits.half().float().clone()
    want[0, 9] -= 100.0
    want[0, 1] += 2.0 - 0.5 * 2 - 0.25
    want[0, 4] -= 0.5 + 0.25
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_logprobs_are_those_of_the_sampling_distribution():
    s = Sampler("cpu")
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [2.0, 1.0, 0.0, -1.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=2)]
    tokens = torch.tensor([1, 1])
    chosen, top, ids = s.logprobs(logits, params, tokens, 3)
    greedy = logits[0].log_softmax(-1)  # greedy rows: temperature 1
    assert chosen[0].item() == pytest.approx(greedy[1].item(), abs=1e-6)
    assert ids[0].tolist() == [1, 3, 2]
    # temperature 0.5 over the two kept tokens; the third alternative was filtered out (-inf)
    kept = (logits[1, :2] / 0.5).log_softmax(-1)
    assert chosen[1].item() == pytest.approx(kept[1].item(), abs=1e-6)
    assert ids[1, :2].tolist() == [0, 1] and top[1, 2].item() == float("-inf")


def test_greedy_and_filters():
    s = Sampler("cpu")
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert s.sample(logits, [SamplingParams(temperature=0)] * 2, [None, None]).tolist() == [1, 0]
    f = s.filtered_logits(logits, [SamplingParams(top_k=2), SamplingParams(top_k=1)])
    assert torch.isinf(f[0]).tolist() == [True, False, True, False]
    assert torch.isinf(f[1]).tolist() == [False, True, True, True]
    # probabilities 0.5, 0.3, 0.2: top_p=0.6 keeps the first two, top_p=0.5 only the first
    lp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(s.filtered_logits(lp, [SamplingParams(top_p=0.6)])).tolist() == [[True, True, False]]
    assert torch.isfinite(s.filtered_logits(lp, [SamplingParams(top_p=0.5)])).tolist() == [[True, False, False]]
    # as transformers: ties at the k-th value keep the lower token ids, and top-p applies to the
    # renormalised top-k distribution (0.4/0.7 already reaches 0.5: one token, not three)
    tied = torch.tensor([[0.4, 0.3, 0.3, 1e-4]]).log()
    assert torch.isfinite(s.filtered_logits(tied, [SamplingParams(top_k=2)])).tolist() == [[True, True, False, False]]
    assert torch.isfinite(s.filtered_logits(tied, [SamplingParams(top_k=2, top_p=0.5)])).tolist() == \
        [[True, False, False, False]]
    # mixed batch: the greedy row stays greedy
    out = s.sample(logits, [SamplingParams(temperature=0), SamplingParams(temperature=1.0)], [None, None])
    assert out[0].item() == 1


def test_sampling_matches_the_distribution():
    s = Sampler("cpu", seed=0)
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    tokens = s.sample(p.log().expand(n, 4), [SamplingParams()] * n, [None] * n)
    freq = torch.bincount(tokens, minlength=4).float() / n
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)
    # temperature sharpens, top_k truncates
    tokens = s.sample(p.log().expand(n, 4), [SamplingParams(top_k=2)] * n, [None] * n)
    assert set(tokens.tolist()) == {2, 3}


def test_seeded_rows_do_not_depend_on_the_batch():
    s = Sampler("cpu")
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=123)
    alone = s.sample(logits[1:2], [p], [s.request_generator(7)])
    batched = s.sample(logits, [SamplingParams()] * 3, [None, s.request_generator(7), None])
    assert alone.item() == batched[1].item()


def test_speculative_rule_keeps_the_target_distribution():
    """Accept d with probability p(d), else resample from p without d: the first token is then
    distributed exactly as p, and greedy rows accept iff d is the argmax."""
    s = Sampler("cpu", seed=1)
    n, v = 20000, 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = p.log().expand(n, 2, v)
    draft = torch.full((n,), 1)
    first, second, accepted = s.verify(logits, draft, [SamplingParams()] * n, [None] * n)
    freq = torch.bincount(first, minlength=v).float() / n
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)
    assert abs(accepted.float().mean().item() - 0.2) < 0.015
    assert (first[accepted] == 1).all()
    g_first, g_second, g_acc = s.verify(torch.tensor([[[0.0, 1.0], [2.0, 0.0]]] * 2), torch.tensor([1, 0]),
                                        [SamplingParams(temperature=0)] * 2, [None, None])
    assert g_first.tolist() == [1, 1] and g_second.tolist() == [0, 0] and g_acc.tolist() == [True, False]
