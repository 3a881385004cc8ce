"""The engine in a child process (leanmoe.infer.engine_process): same outputs as in-process,
aborts, a dead child, a child that cannot load, and a server over it."""

import asyncio
import time

import pytest
import torch

from leanmoe.infer import LLM, SamplingParams
from leanmoe.infer.async_engine import EngineDeadError
from leanmoe.infer.engine_process import EngineProcess
from tests.infer.helpers import KEY, MODEL, ServerThread, random_prompts

OPTIONS = dict(max_model_len=256, block_size=8)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
THREADS = torch.get_num_threads()  # the child computes as this process does: same sums, same tokens


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = EngineProcess(LLM(checkpoint, **OPTIONS), checkpoint, threads=THREADS)
    eng.start()
    yield eng
    eng.shutdown()
    assert not eng.is_running


async def _collect(engine, seq):
    outs = [o async for o in engine.generate(seq)]
    return outs


def test_outputs_equal_the_in_process_engine(engine, checkpoint):
    prompts = random_prompts([5, 17, 9, 30], seed=3)
    seeded = SamplingParams(temperature=1.0, max_tokens=10, seed=7)
    expected = LLM(checkpoint, **OPTIONS).generate(prompts + prompts[:1], [GREEDY] * 4 + [seeded])

    async def run():
        seqs = [engine.llm.make_sequence(p, sp, f"r{i}", stream=True)
                for i, (p, sp) in enumerate(zip(prompts + prompts[:1], [GREEDY] * 4 + [seeded]))]
        return await asyncio.gather(*(_collect(engine, s) for s in seqs))

    results = asyncio.run(run())
    for outs, want in zip(results, expected):
        assert outs[-1].finished and outs[-1].token_ids == want.token_ids  # greedy and seeded sampling alike
        assert outs[-1].text == want.text
        assert [t for o in outs for t in o.delta_token_ids] == want.token_ids  # streamed once each
        assert outs[-1].metrics["time_to_first_token"] > 0
    c = engine.counters()
    assert c["generation_tokens"] >= 4 * 12 + 10 and c["running"] == 0


def test_leaving_early_aborts_the_request_in_the_child(engine):
    async def run():
        long = engine.llm.make_sequence([7, 8, 9], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "long")
        async for out in engine.generate(long):
            assert not out.finished
            break  # the client went away
        short = engine.llm.make_sequence([7, 8], GREEDY, "short")
        return await _collect(engine, short)

    outs = asyncio.run(run())
    assert outs[-1].finished
    assert engine.counters()["running"] == 0  # the aborted request no longer runs


def test_a_request_the_child_refuses_fails_alone(engine):
    async def run():
        ok = asyncio.create_task(_collect(engine, engine.llm.make_sequence([7, 8, 9], GREEDY, "ok")))
        bad = engine.llm.make_sequence([7, 8, 9], GREEDY, "bad")
        bad.token_ids[0] = 10**6  # past the front's validation: the child's make_sequence refuses it
        with pytest.raises(ValueError, match="token ids must be in"):
            await _collect(engine, bad)
        with pytest.raises(ValueError, match="already in use"):  # checked in this process
            await asyncio.gather(_collect(engine, engine.llm.make_sequence([7], GREEDY, "dup")),
                                 _collect(engine, engine.llm.make_sequence([7], GREEDY, "dup")))
        return await ok

    assert asyncio.run(run())[-1].finished
    assert engine.is_running


def test_a_dead_child_fails_waiting_requests_and_health(checkpoint):
    eng = EngineProcess(LLM(checkpoint, **OPTIONS), checkpoint, threads=THREADS)
    eng.start()
    try:
        async def run():
            seq = eng.llm.make_sequence([7, 8, 9], SamplingParams(temperature=0, max_tokens=250, ignore_eos=True), "x")
            with pytest.raises(EngineDeadError):
                async for out in eng.generate(seq):
                    eng._proc.kill()  # the child dies mid-request
            with pytest.raises(EngineDeadError):
                await _collect(eng, eng.llm.make_sequence([7], GREEDY, "y"))

        asyncio.run(run())
        assert not eng.is_running
    finally:
        eng.shutdown()


def test_a_child_that_cannot_load_is_an_error_at_start(checkpoint, tmp_path):
    eng = EngineProcess(LLM(checkpoint, **OPTIONS), tmp_path / "missing", threads=1)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="failed to start.*missing"):
        eng.start()
    assert time.monotonic() - t0 < 120 and not eng.is_running


def test_server_over_an_engine_process(checkpoint):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from leanmoe.infer.server import create_app

    want = LLM(checkpoint, **OPTIONS).generate([[7, 8, 9, 10]], GREEDY)[0]
    app = create_app(EngineProcess(LLM(checkpoint, **OPTIONS), checkpoint, threads=THREADS), MODEL, api_key=KEY)
    headers = {"Authorization": f"Bearer {KEY}"}
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        body = {"model": MODEL, "prompt": [7, 8, 9, 10], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want.text
        metrics = httpx.get(srv.url + "/metrics", headers=headers).text
        line = next(x for x in metrics.splitlines() if x.startswith("leanmoe:generation_tokens_total"))
        assert float(line.split()[-1]) >= 12
