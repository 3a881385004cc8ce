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
