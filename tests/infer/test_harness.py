"""leanmoe/infer/harness.py: lm-eval runs loglikelihood, rolling and generate_until tasks defined
over local files against a checkpoint, in-process and through `leanmoe eval`, and the scores are
those of a full forward pass."""

from __future__ import annotations

import json
import math

import pytest
import torch

from leanmoe.cli import main
from leanmoe.infer import LLM
from leanmoe.infer.harness import evaluate
from tests.util import write_local_tasks


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_local_tasks(tmp_path_factory.mktemp("tasks"))


def test_lm_eval_runs_all_three_request_kinds(checkpoint, tasks):
    res = evaluate(checkpoint, ["leanmoe_ll", "leanmoe_gen", "leanmoe_rolling"], include_path=str(tasks))
    r = res["results"]
    assert 0.0 <= r["leanmoe_ll"]["acc,none"] <= 1.0
    assert 0.0 <= r["leanmoe_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(r["leanmoe_rolling"]["word_perplexity,none"]) and r["leanmoe_rolling"]["word_perplexity,none"] > 1


@torch.no_grad()
def test_loglikelihoods_are_those_of_a_full_forward_pass(checkpoint):
    from leanmoe.infer import harness

    llm = LLM(checkpoint)
    lm = harness.LeanMoeLM(llm=llm)

    class Req:
        def __init__(self, *args):
            self.args = args

    got = lm.loglikelihood([Req("The engine keeps a", " paged cache"), Req("", "one two")])
    tok = llm.tokenizer
    for (ctx, cont), (lp, _) in zip([("The engine keeps a", " paged cache"), ("", "one two")], got):
        c = tok.encode(ctx) or [tok.eos_id]
        whole = tok.encode(ctx + cont)
        cont_ids = whole[len(tok.encode(ctx)):]
        logp = llm.model(torch.tensor([c + cont_ids])).float().log_softmax(-1)[0]
        want = sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(cont_ids))
        assert lp == pytest.approx(want, abs=1e-4)
    (rolling,) = lm.loglikelihood_rolling([Req("one two three four five")])
    ids = tok.encode("one two three four five")
    logp = llm.model(torch.tensor([[tok.eos_id] + ids[:-1]])).float().log_softmax(-1)[0]
    assert rolling == pytest.approx(sum(float(logp[i, t]) for i, t in enumerate(ids)), abs=1e-4)


def test_leanmoe_eval_command_prints_lm_evals_table(checkpoint, tasks, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert main(["eval", str(checkpoint), "--tasks", "leanmoe_ll", "--include-path", str(tasks),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "leanmoe_ll" in printed and "acc" in printed
    assert "leanmoe_ll" in json.loads(out.read_text())["results"]


def test_lm_eval_local_completions_against_leanmoe_serve(server, checkpoint, tasks, monkeypatch):
    """lm-eval's own OpenAI client (`local-completions`) against the server: it finds vLLM's
    tokenizer routes (no tokenizer download), scores with echo + logprobs, generates with stop
    strings, and gets what LeanMoeLM gets in-process."""
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from leanmoe.infer import harness
    from tests.infer.helpers import KEY, MODEL

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # local-completions sends it as the bearer token
    names = ["leanmoe_ll", "leanmoe_gen", "leanmoe_rolling"]
    eos = server.llm.tokenizer.eos_id  # LeanMoeLM's prefix for an empty context
    args = {"model": MODEL, "base_url": server.url + "/v1/completions", "auth_token": KEY, "max_length": 256,
            "custom_prefix_token_id": eos, "max_retries": 1, "timeout": 60}
    served = lm_eval.simple_evaluate(model=LocalCompletionsAPI(**args), tasks=names, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tasks)), bootstrap_iters=0)
    local = lm_eval.simple_evaluate(model=harness.LeanMoeLM(llm=LLM(checkpoint, max_model_len=256)), tasks=names,
                                    log_samples=True, task_manager=TaskManager(include_path=str(tasks)),
                                    bootstrap_iters=0)

    def responses(res, task):
        return [s["resps"] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]

    for task in ("leanmoe_ll", "leanmoe_rolling"):
        got, want = responses(served, task), responses(local, task)
        flat = [(float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0])) for doc in got for r in doc]
        ref = [(float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0])) for doc in want for r in doc]
        assert len(flat) == len(ref) > 0 and flat == pytest.approx(ref, abs=1e-3), task
    ll_greedy = [r[0][1] for doc in responses(served, "leanmoe_ll") for r in doc]
    assert ll_greedy == [r[0][1] for doc in responses(local, "leanmoe_ll") for r in doc]
    assert responses(served, "leanmoe_gen") == responses(local, "leanmoe_gen")
    assert served["results"]["leanmoe_ll"]["acc,none"] == local["results"]["leanmoe_ll"]["acc,none"]
