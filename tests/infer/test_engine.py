"""leanmoe/infer/engine.py: greedy equality with a plain forward, batching invariance, block
accounting, prefix sharing, preemption, streaming, stop conditions, loading from a folder."""

import random

import pytest

from leanmoe.infer import LLM, SamplingParams
from tests.infer.helpers import greedy_reference, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LENGTHS = [1, 5, 8, 9, 17, 31, 40]  # around block_size=8 boundaries


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS)


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [greedy_reference(model, p, GREEDY.max_tokens) for p in prompts]


@pytest.mark.parametrize("speculative", [False, True])
def test_greedy_equals_full_sequence_forward(model, prompts, reference, speculative):
    llm = LLM(model, block_size=8, speculative=speculative)
    outs = llm.generate(prompts, GREEDY)
    for p, o, ref in zip(prompts, outs, reference):
        assert o.token_ids == ref, f"prompt of {len(p)} tokens"
        assert o.finish_reason == "length" and o.finished
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_batching_does_not_change_outputs(model, prompts, reference):
    llm = LLM(model, block_size=4, max_num_seqs=3, speculative=False)  # requests join as others leave
    params = [SamplingParams(temperature=0, max_tokens=min(12, 3 + 2 * i), ignore_eos=True)
              for i in range(len(prompts))]
    batched = llm.generate(prompts, params)
    for i, (o, ref) in enumerate(zip(batched, reference)):
        assert o.token_ids == ref[: min(12, 3 + 2 * i)]
    one_by_one = [llm.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in one_by_one] == [o.token_ids for o in batched]


def test_preemption_by_recompute_keeps_outputs_and_frees_everything(model, prompts, reference):
    # 12 blocks of 4 tokens cannot hold all sequences at once: some are preempted and recomputed
    llm = LLM(model, block_size=4, num_blocks=14, max_model_len=52, speculative=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert llm.stats()["preemptions"] > 0
    assert llm.block_manager.num_free_blocks == 14
    llm.block_manager.check()


def test_no_block_leaks_after_many_requests_and_aborts(model):
    rng = random.Random(0)
    llm = LLM(model, block_size=4, num_blocks=24, max_num_seqs=6, max_model_len=64, speculative=True)
    ids = []
    for i in range(40):
        prompt = random_prompts([rng.randint(1, 20)], seed=i)[0]
        sp = SamplingParams(temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([0, 5]), max_tokens=rng.randint(1, 12),
                            seed=i)
        ids.append(llm.add_request(prompt, sp))
        if i % 3 == 0:
            llm.step()
        if i % 7 == 0:
            llm.abort(ids[rng.randrange(len(ids))])
    while llm.has_unfinished():
        llm.step()
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0
    bm.check()


def test_prefix_sharing_reuses_blocks_and_keeps_outputs(model):
    shared = random_prompts([24], seed=5)[0]
    tails = random_prompts([3, 6, 1], seed=6)
    prompts = [shared + t for t in tails]
    refs = [greedy_reference(model, p, 6) for p in prompts]
    for speculative in (False, True):
        llm = LLM(model, block_size=8, speculative=speculative)
        sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        first = llm.generate(prompts[0], sp)[0]
        rest = llm.generate(prompts[1:], sp)
        assert [o.token_ids for o in [first, *rest]] == refs
        assert first.num_cached_prompt_tokens == 0
        # with an MTP layer a block's latents also depend on the token after it: the third block
        # (tokens 16..23) is followed by different tails, so only two blocks are shared
        expected = 16 if speculative else 24
        assert [o.num_cached_prompt_tokens for o in rest] == [expected, expected]
        assert llm.stats()["prefix_cache_hit_rate"] > 0.3
        assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    off = LLM(model, block_size=8, enable_prefix_caching=False)
    assert [o.num_cached_prompt_tokens for o in off.generate(prompts, sp)] == [0, 0, 0]


def test_stop_tokens_stop_strings_and_lengths(model, tokenizer, checkpoint):
    llm = LLM(checkpoint, speculative=False)
    prompt = "Once upon a time"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert len(full.token_ids) == 10 and full.finish_reason == "length"
    stop_tok = full.token_ids[4]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: full.token_ids.index(stop_tok)]
    text = full.text
    pieces = [tokenizer.decode([t]) for t in full.token_ids[2:]]
    needle = next(p for p in pieces if p.strip() and "\ufffd" not in p)  # a clean piece of the output
    s = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop=[needle], ignore_eos=True))[0]
    assert s.finish_reason == "stop" and s.text == text[: text.index(needle)]
    # the context ends generation
    short = LLM(checkpoint, max_model_len=8)
    o = short.generate([5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(o.token_ids) == 3 and o.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        short.generate(list(range(10, 18)), GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        short.generate([[1, 2, 10_000]], GREEDY)


def test_stream_matches_generate_and_abort_frees(checkpoint):
    llm = LLM(checkpoint)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full = llm.generate("The engine keeps", sp)[0]
    chunks = list(llm.stream("The engine keeps", sp))
    assert "".join(c.delta_text for c in chunks) == full.text == chunks[-1].text
    assert sum((c.delta_token_ids for c in chunks), []) == full.token_ids
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    it = llm.stream("The engine keeps", sp)
    next(it)
    it.close()  # the consumer walked away
    assert not llm.has_unfinished() and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_loads_run_folder_text_prompts_and_seeds(checkpoint, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-5").symlink_to(checkpoint, target_is_directory=True)
    (run / "checkpoints" / "latest").symlink_to("step-5")
    llm = LLM(run)
    assert llm.tokenizer is not None and llm.chat_stop_token_ids() == [llm.tokenizer.id_of("<|end|>")]
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=3, ignore_eos=True)
    a = llm.generate(["hello", "world"], sp)
    b = llm.generate(["world", "hello"], sp)
    assert a[0].token_ids == b[1].token_ids and a[1].token_ids == b[0].token_ids  # seeds, not batch order
    assert llm.generate("", SamplingParams(max_tokens=2))[0].prompt_token_ids == [llm.tokenizer.bos_id]
