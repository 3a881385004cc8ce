"""leanmoe/infer/model_runner.py: MTP speculative decoding. Greedy output is identical with and
without it, drafts are what the MTP module predicts, and sampled requests work alongside."""

import pytest
import torch

from leanmoe.infer import LLM, SamplingParams
from tests.infer.helpers import greedy_reference, make_drafting_model, random_prompts


@pytest.fixture(scope="module")
def drafting_model():
    return make_drafting_model(eps=0.3)


def test_speculative_greedy_equals_plain_greedy(drafting_model):
    prompts = random_prompts([1, 3, 9, 17, 30, 5, 12, 40], seed=3)
    n = 20
    refs = [greedy_reference(drafting_model, p, n) for p in prompts]
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    plain = LLM(drafting_model, block_size=8, speculative=False)
    spec = LLM(drafting_model, block_size=8, speculative=True)
    assert [o.token_ids for o in plain.generate(prompts, sp)] == refs
    outs = spec.generate(prompts, sp)
    assert [o.token_ids for o in outs] == refs
    stats = spec.stats()
    # both paths exercised: drafts accepted (two tokens per step) and rejected
    assert 0.15 < stats["acceptance_rate"] < 0.95, stats
    assert stats["steps"] < plain.stats()["steps"]
    assert spec.block_manager.num_free_blocks == spec.block_manager.num_blocks


@torch.no_grad()
def test_first_draft_is_the_mtp_prediction(drafting_model):
    model = drafting_model
    prompt = random_prompts([13], seed=4)[0]
    llm = LLM(model, block_size=8)
    llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    llm.step()  # prefill: samples t_n and drafts t_{n+1}
    seq = llm.scheduler.running[0]
    ids = torch.tensor([prompt])
    h, _ = model.hidden_states(ids)
    t_n = int(model.lm_head(h)[0, -1].argmax())
    next_ids = torch.tensor([prompt[1:] + [t_n]])
    _, mtp_logits, _ = model.mtp_step(1, h, next_ids, torch.arange(len(prompt))[None])
    assert seq.token_ids[-1] == t_n
    assert seq.draft == int(mtp_logits[0, -1].argmax())


def test_sampled_requests_with_speculation(drafting_model):
    prompts = random_prompts([4, 10, 7], seed=5)
    llm = LLM(drafting_model, block_size=8)
    params = [SamplingParams(temperature=0.7, top_k=20, max_tokens=15, seed=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.8, max_tokens=15, seed=2, ignore_eos=True)]
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [15, 15, 15]
    assert outs[1].token_ids == greedy_reference(drafting_model, prompts[1], 15)
    again = LLM(drafting_model, block_size=8).generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]  # seeded: reproducible


def test_speculative_with_preemption_and_prefix_hits(drafting_model):
    shared = random_prompts([9], seed=7)[0]
    prompts = [shared + t for t in random_prompts([3, 0, 8, 5], seed=8)]
    refs = [greedy_reference(drafting_model, p, 12) for p in prompts]
    llm = LLM(drafting_model, block_size=4, num_blocks=12, max_model_len=40)  # forces recompute
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == refs
    assert llm.stats()["preemptions"] > 0
    assert llm.block_manager.num_free_blocks == 12
    llm.block_manager.check()
