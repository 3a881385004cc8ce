"""leanmoe/infer/scoring.py: batched, padded scoring equals one unpadded forward pass per sequence."""

import pytest
import torch

from leanmoe.infer.scoring import score_continuations, token_logprobs


@torch.no_grad()
def _reference(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    logp = model(ids).float().log_softmax(-1)[0]
    lp = [float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)]
    greedy = all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    return sum(lp), greedy


def test_batched_scores_equal_one_forward_pass_each(model):
    g = torch.Generator().manual_seed(0)
    v = model.config.vocab_size
    reqs = [(torch.randint(0, v, (n,), generator=g).tolist(), torch.randint(0, v, (m,), generator=g).tolist())
            for n, m in [(1, 1), (5, 3), (17, 1), (2, 9), (30, 4)]]
    model.eval()
    got = score_continuations(model, reqs, max_len=64, max_batch_tokens=40)  # several padded batches
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        want_lp, want_greedy = _reference(model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy


@torch.no_grad()
def test_a_greedy_continuation_is_flagged(model):
    ctx = [3, 4, 5]
    nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    (_, greedy), = score_continuations(model, [(ctx, [nxt])], max_len=64)
    assert greedy


def test_long_contexts_are_cut_from_the_left(model):
    ctx, cont = list(range(1, 90)), [7, 8]
    (lp, _), = score_continuations(model, [(ctx, cont)], max_len=20)
    want, _ = _reference(model, ctx[-(21 - len(cont)):], cont)
    assert lp == pytest.approx(want, abs=1e-4)


@torch.no_grad()
def test_token_logprobs_with_top_alternatives(model):
    ids = [5, 9, 2, 11]
    out = token_logprobs(model, ids, top_n=3)
    logp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    assert [t.token for t in out] == ids and out[0].logprob is None
    for i in range(1, len(ids)):
        assert out[i].logprob == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-5)
        assert [t for t, _ in out[i].top] == logp[i - 1].topk(3).indices.tolist()
        assert out[i].top[0][1] >= out[i].top[-1][1]


def test_empty_context_is_refused(model):
    with pytest.raises(ValueError, match="context is empty"):
        score_continuations(model, [([], [1])], max_len=8)
