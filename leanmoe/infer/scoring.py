"""Scoring text with a full forward pass: the log-probabilities of given tokens, which evaluation
harnesses ask for (lm-eval's loglikelihood tasks, OpenAI's `echo` + `logprobs`).

    score_continuations(model, [(context_ids, continuation_ids), ...], max_len)
        -> [(sum of log p(continuation | context), whether greedy decoding would produce it), ...]
    token_logprobs(model, ids, top_n) -> per token: its log-probability given the tokens before it
        (None for the first) and the top_n most likely alternatives

Sequences are batched longest first and right-padded: attention is causal, so padding after a
sequence changes none of its positions. Log-softmax runs in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch

from leanmoe.infer.logprobs import TokenLogprob
from leanmoe.model import Transformer

__all__ = ["score_continuations", "token_logprobs", "logprob_rows", "TokenLogprob"]


def _batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so a batch's padded size stays under max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and lengths[out[-1][0]] * (len(out[-1]) + 1) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _forward(model: Transformer, seqs: list[list[int]]) -> torch.Tensor:
    """log-softmax logits [B, T, V] (fp32) of right-padded sequences."""
    device = next(model.parameters()).device
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return model(ids.to(device)).float().log_softmax(-1)


@torch.no_grad()
def score_continuations(model: Transformer, requests: list[tuple[list[int], list[int]]], max_len: int,
                        max_batch_tokens: int = 8192) -> list[tuple[float, bool]]:
    """For each (context, continuation) of token ids: the summed log-probability of the continuation
    after the context, and whether it is the greedy (argmax) continuation. Contexts are cut from the
    left so context + continuation fits `max_len` + 1 tokens; the context must not be empty."""
    inputs, n_cont = [], []
    for ctx, cont in requests:
        if not ctx:
            raise ValueError("score_continuations: the context is empty; start it with a bos/eos token")
        if not cont:
            raise ValueError("score_continuations: the continuation is empty")
        whole = (ctx + cont)[-(max_len + 1):]
        inputs.append(whole)
        n_cont.append(min(len(cont), len(whole) - 1))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for batch in _batches([len(s) - 1 for s in inputs], max_batch_tokens):
        logp = _forward(model, [inputs[i][:-1] for i in batch])
        for row, i in enumerate(batch):
            seq, n = inputs[i], n_cont[i]
            pos = torch.arange(len(seq) - 1 - n, len(seq) - 1)
            target = torch.tensor(seq[-n:], device=logp.device)
            lp = logp[row, pos.to(logp.device)]  # [n, V]
            out[i] = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
    return out


@torch.no_grad()
def token_logprobs(model: Transformer, ids: list[int], top_n: int = 0) -> list[TokenLogprob]:
    """log p(ids[i] | ids[:i]) for every token of one sequence (at most the model's context), with
    the `top_n` most likely tokens at each position."""
    if not ids:
        return []
    logp = _forward(model, [ids])[0]  # [T, V]; row i predicts token i + 1
    return [TokenLogprob(ids[0], None, [])] + logprob_rows(logp[:-1], ids[1:], top_n)


def logprob_rows(logp_TV: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprob]:
    """Row t of log-probabilities [T, V] scored at targets[t], with its `top_n` most likely ids."""
    if not targets:
        return []
    target = torch.tensor(targets, device=logp_TV.device)
    chosen = logp_TV.gather(-1, target[:, None])[:, 0].tolist()  # host sync: the caller asked for logprobs
    if top_n > 0:
        vals, idx = logp_TV.topk(min(top_n, logp_TV.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in targets]
    return [TokenLogprob(t, c, top) for t, c, top in zip(targets, chosen, tops)]
