"""leanmoe/infer/responses.py over loopback with the official openai client: completions' logprobs
and echo (also with max_tokens 0 and token-id prompts, as lm-eval sends them), chat logprobs,
streamed logprobs, and penalties / logit_bias as the engine applies them. The values are those of
a full forward pass. The `server` fixture is in conftest.py."""

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from leanmoe.infer import LLM, SamplingParams  # noqa: E402
from leanmoe.infer.logprobs import TokenStrings  # noqa: E402
from leanmoe.infer.scoring import token_logprobs  # noqa: E402
from tests.infer.helpers import KEY, MODEL  # noqa: E402

PROMPT = "The engine keeps a paged"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(checkpoint):
    """A separate engine over the same checkpoint (the server's belongs to its engine thread)."""
    return LLM(checkpoint, max_model_len=256, block_size=8)


def full_forward(llm, ids: list[int], top_n: int):
    return token_logprobs(llm.model, ids, top_n)


def test_completion_logprobs_equal_a_full_forward(llm, client):
    tok = llm.tokenizer
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    lp = c.logprobs
    prompt_ids = tok.encode(PROMPT)
    out_ids = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids
    ref = full_forward(llm, prompt_ids + out_ids, 3)[len(prompt_ids):]
    strings = TokenStrings(tok)
    assert lp.tokens == [strings.text(t) for t in out_ids]  # partial UTF-8 tokens as "bytes:\\x.."
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), torch.tensor([e.logprob for e in ref]),
                               atol=1e-4, rtol=0)
    for top, e, token in zip(lp.top_logprobs, ref, lp.tokens):
        assert len(top) in (3, 4) and top[token] == max(top.values())  # the greedy token, plus 3 alternatives
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx([v for _, v in e.top], abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(6)]


def test_echo_scores_the_prompt_as_lm_eval_asks(server, llm, client):
    tok = llm.tokenizer
    ids = tok.encode(PROMPT)
    ref = full_forward(llm, ids, 1)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert len(c.logprobs.tokens) == len(ids) and "".join(c.logprobs.tokens) == PROMPT
    torch.testing.assert_close(torch.tensor(c.logprobs.token_logprobs[1:]),
                               torch.tensor([e.logprob for e in ref[1:]]), atol=1e-4, rtol=0)
    # lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1, several prompts
    body = {"model": MODEL, "prompt": [ids, ids[:3]], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
            "seed": 1234}
    res = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                     timeout=60).json()
    first, second = sorted(res["choices"], key=lambda ch: ch["index"])
    assert len(first["logprobs"]["token_logprobs"]) == len(ids) + 1 and first["text"].startswith(PROMPT)
    assert first["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-5)
    assert len(second["logprobs"]["tokens"]) == 4
    # echo without logprobs: the prompt and the completion, no logprobs
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True, temperature=0)
    assert plain.choices[0].text.startswith(PROMPT) and plain.choices[0].logprobs is None


def test_chat_logprobs(server, client):
    messages = [{"role": "user", "content": "Count to five."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2)
    ch = r.choices[0]
    content = ch.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == ch.message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token  # greedy
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob) and e.logprob <= 0
    none = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, logprobs=False)
    assert none.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, top_logprobs=2)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_streamed_completion_logprobs_and_echo(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                      echo=True, extra_body={"ignore_eos": True}).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2, echo=True, stream=True,
        extra_body={"ignore_eos": True})]
    assert "".join(c.text for c in chunks) == whole.text and chunks[0].text.startswith(PROMPT)
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert chunks[0].logprobs.token_logprobs[0] is None


def test_penalties_and_logit_bias_as_the_engine_applies_them(llm, client):
    tok = llm.tokenizer
    ids = tok.encode(PROMPT)
    forced = tok.encode(" cache")[-1]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([forced] * 4)
    kw = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={str(forced): -100})
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True}, **kw).choices[0]
    want = llm.generate(ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0,
                                            frequency_penalty=1.5, presence_penalty=0.5,
                                            logit_bias={forced: -100.0}))[0]
    assert got.text == want.text and forced not in want.token_ids
    assert got.logprobs.token_logprobs == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)
