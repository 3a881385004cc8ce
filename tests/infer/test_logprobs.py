"""leanmoe/infer/logprobs.py and the engine's logprobs: generated-token logprobs are those of the
distribution sampled from and agree with a full forward pass (with and without speculation,
logit_bias, penalties, top-k); prompt logprobs equal scoring.token_logprobs; OpenAI shapes."""

import pytest
import torch

from leanmoe.infer import LLM, SamplingParams
from leanmoe.infer.logprobs import TokenLogprob, TokenStrings, chat_logprobs, completion_logprobs
from leanmoe.infer.scoring import token_logprobs
from tests.infer.helpers import make_drafting_model, random_prompts

PROMPTS = random_prompts([1, 6, 9, 17], seed=11)


@torch.no_grad()
def adjusted_logprobs(model, prompt: list[int], output: list[int], sp: SamplingParams) -> torch.Tensor:
    """The definition: log_softmax over the full forward's logits at each output position, with
    the bias, the penalties over the output before it, temperature (1 if greedy) and top-k."""
    logits = model(torch.tensor([prompt + output]))[0].float()
    rows = []
    for j in range(len(output)):
        row = logits[len(prompt) - 1 + j].clone()
        for t, b in sp.logit_bias.items():
            row[t] += b
        counts = torch.bincount(torch.tensor(output[:j], dtype=torch.long), minlength=row.numel()).float()
        row -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)
        row /= sp.temperature or 1.0
        if sp.top_k:
            row[row < row.topk(sp.top_k).values[-1]] = float("-inf")
        rows.append(row.log_softmax(-1))
    return torch.stack(rows)


def check_logprobs(model, prompt, out, sp: SamplingParams, atol=1e-4):
    assert out.logprobs is not None and [e.token for e in out.logprobs] == out.token_ids
    want = adjusted_logprobs(model, prompt, out.token_ids, sp)
    got = torch.tensor([e.logprob for e in out.logprobs])
    torch.testing.assert_close(got, want.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0], atol=atol, rtol=0)
    for e, row in zip(out.logprobs, want):
        n = min(sp.logprobs, int(torch.isfinite(row).sum()))  # filtered tokens are never alternatives
        assert len(e.top) == n
        torch.testing.assert_close(torch.tensor([v for _, v in e.top]), row.topk(n).values, atol=atol, rtol=0)
        assert all(row[t] > float("-inf") for t, _ in e.top)


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_logprobs_equal_a_full_forward(model, speculative):
    llm = LLM(model, block_size=8, speculative=speculative)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    for p, o in zip(PROMPTS, llm.generate(PROMPTS, sp)):
        check_logprobs(model, p, o, sp)
        assert all(e.top[0][0] == e.token for e in o.logprobs)  # greedy: the chosen token leads


@pytest.mark.parametrize("speculative", [False, True])
def test_logit_bias_shifts_the_logprobs(model, speculative):
    llm = LLM(model, block_size=8, speculative=speculative)
    plain = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    banned, favoured = plain.token_ids[0], 7
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2,
                        logit_bias={banned: -100.0, favoured: 3.5})
    out = llm.generate(PROMPTS[2], sp)[0]
    assert banned not in out.token_ids
    check_logprobs(model, PROMPTS[2], out, sp)
    forced = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                     logit_bias={favoured: 100.0}))[0]
    assert forced.token_ids == [favoured] * 4


@pytest.mark.parametrize("speculative", [False, True])
def test_sampled_logprobs_follow_temperature_top_k_and_penalties(model, speculative):
    llm = LLM(model, block_size=8, speculative=speculative)
    sp = SamplingParams(temperature=0.7, top_k=5, seed=3, max_tokens=12, ignore_eos=True, logprobs=8,
                        frequency_penalty=0.8, presence_penalty=0.3)
    for p, o in zip(PROMPTS, llm.generate(PROMPTS, sp)):
        check_logprobs(model, p, o, sp)


def test_penalised_greedy_output_is_the_same_with_and_without_speculation():
    """The verify step's second position counts the draft (= the first token when it is kept)."""
    model = make_drafting_model(eps=0.3)
    prompts = random_prompts([3, 9, 14], seed=12)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=1.2, presence_penalty=0.5,
                        logit_bias={20: 1.5}, logprobs=2)
    plain = LLM(model, block_size=8, speculative=False).generate(prompts, sp)
    spec_llm = LLM(model, block_size=8, speculative=True)
    spec = spec_llm.generate(prompts, sp)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert spec_llm.stats()["accepted_draft_tokens"] > 0  # the second position was used
    for p, a, b in zip(prompts, plain, spec):
        check_logprobs(model, p, b, sp)
        torch.testing.assert_close(torch.tensor([e.logprob for e in a.logprobs]),
                                   torch.tensor([e.logprob for e in b.logprobs]), atol=1e-4, rtol=0)
    # penalties change the greedy output: the definition, step by step
    ids = list(prompts[1])
    for _ in range(16):
        ids.append(int(adjusted_logprobs(model, prompts[1], ids[len(prompts[1]):] + [0], sp)[-1].argmax()))
    assert plain[1].token_ids == ids[len(prompts[1]):]


@pytest.mark.parametrize("speculative", [False, True])
def test_prompt_logprobs_equal_scoring_and_max_tokens_zero(model, speculative, monkeypatch):
    from leanmoe.infer import model_runner

    monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_CHUNK", 5 * model.config.vocab_size)  # 5 rows at a time
    llm = LLM(model, block_size=4, speculative=speculative)
    prompt = PROMPTS[3]
    llm.generate(prompt, SamplingParams(max_tokens=2))  # its blocks are now in the prefix cache
    out = llm.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=4))[0]
    assert out.token_ids == [] and out.finish_reason == "length" and out.num_cached_prompt_tokens == 0
    want = token_logprobs(model, prompt, top_n=4)
    assert [e.token for e in out.prompt_logprobs] == prompt and out.prompt_logprobs[0].logprob is None
    for got, ref in zip(out.prompt_logprobs[1:], want[1:]):
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in ref.top]
    again = llm.generate(prompt, SamplingParams(max_tokens=1))[0]
    assert again.num_cached_prompt_tokens > 0 and again.prompt_logprobs is None
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_logprobs_survive_preemption_streaming_and_stop_tokens(model):
    llm = LLM(model, block_size=4, num_blocks=14, max_model_len=52, speculative=False)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    prompts = random_prompts([5, 8, 9, 17, 31, 40], seed=13)
    outs = llm.generate(prompts, sp)
    assert llm.stats()["preemptions"] > 0
    for p, o in zip(prompts, outs):
        check_logprobs(model, p, o, sp)
        assert len(o.prompt_logprobs) == len(p)
    full = outs[0]
    chunks = list(llm.stream(prompts[0], sp))
    assert sum((c.delta_logprobs for c in chunks), []) == chunks[-1].logprobs
    assert [e.token for e in chunks[-1].logprobs] == full.token_ids
    stop = full.token_ids[3]  # a stop token is not part of the output, nor is its logprob
    cut = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=12, logprobs=0, stop_token_ids=[stop]))[0]
    assert [e.token for e in cut.logprobs] == cut.token_ids == full.token_ids[: full.token_ids.index(stop)]
    assert all(e.top == [] for e in cut.logprobs)


def test_requests_without_logprobs_get_none(model):
    out = LLM(model).generate(PROMPTS[1], SamplingParams(max_tokens=3))[0]
    assert out.logprobs is None and out.delta_logprobs is None and out.prompt_logprobs is None
    with pytest.raises(ValueError, match="logit_bias"):
        LLM(model).generate(PROMPTS[1], SamplingParams(logit_bias={10_000: 1.0}))


def test_openai_shapes(tokenizer):
    strings = TokenStrings(tokenizer)
    ids = tokenizer.encode("café 🚀 ok")
    entries = [TokenLogprob(ids[0], None)] + [TokenLogprob(t, -0.5, [(ids[0], -0.1), (t, -0.5)]) for t in ids[1:]]
    texts = [strings.text(t) for t in ids]
    assert len(set(texts)) == len(set(ids))  # distinct tokens, distinct strings (partial UTF-8 as bytes:)
    assert b"".join(bytes(strings.bytes(t)) for t in ids).decode() == "café 🚀 ok"
    c = completion_logprobs(strings, entries, text_offset=3)
    assert c["tokens"] == texts and c["token_logprobs"][0] is None and c["top_logprobs"][0] is None
    assert c["top_logprobs"][1] == {texts[0]: -0.1, texts[1]: -0.5}
    assert c["text_offset"][:2] == [3, 3 + len(texts[0])]
    chat = chat_logprobs(strings, entries[1:], top_n=1)["content"]
    assert chat[0] == {"token": texts[1], "logprob": -0.5, "bytes": strings.bytes(ids[1]),
                       "top_logprobs": [{"token": texts[0], "logprob": -0.1, "bytes": strings.bytes(ids[0])}]}
