"""Sampling: the batched sampler (logit bias, penalties, temperature, top-k, top-p, seeds, logprobs)
over per-request SamplingParams.

Shape legend: B sequences in the batch, V vocabulary, N alternatives per token.

The order is vLLM's: raw logits -> `adjust` (logit_bias, presence/frequency penalties over the
output so far) -> temperature -> top-k -> top-p -> sample. `logprobs` reports log-probabilities
under exactly that distribution (temperature 1 for greedy rows). `adjust` and `logprobs` cost
nothing unless some row of the batch asks for them.

Every row of a batch carries its own parameters. Greedy rows (temperature 0) take the argmax; the
others sample with the exponential race: argmax_v p_v / e_v with e_v ~ Exp(1) draws v with
probability p_v (the Gumbel-max trick in another form), which needs no cumulative sums and lets
a seeded request draw its noise from its own generator, so its output does not depend on what
else is in the batch.
"""

from __future__ import annotations

import torch

from leanmoe.infer.sampling_params import SamplingParams

__all__ = ["Sampler"]


class Sampler:
    """Turns last-position logits into tokens. One per engine; holds the generator shared by
    unseeded requests."""

    def __init__(self, device: torch.device | str, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def request_generator(self, seed: int | None) -> torch.Generator | None:
        """A request's own generator (None: draw from the engine's)."""
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    # ------------------------------------------------------------------ building blocks
    @staticmethod
    def adjust(logits_BV: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> torch.Tensor:
        """Apply each row's logit_bias and presence/frequency penalties (OpenAI's definition, over
        the output tokens `outputs[b]` generated before the position row b predicts):
            logits[v] += bias[v] - frequency_penalty * count[v] - presence_penalty * (count[v] > 0)
        -> fp32 logits, or `logits_BV` itself when no row sets any of them (the fast path)."""
        biased = [b for b, p in enumerate(params) if p.logit_bias]
        penalised = [b for b, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
        if not biased and not penalised:
            return logits_BV
        out_BV = logits_BV.to(torch.float32, copy=True)
        dev, vocab = out_BV.device, out_BV.shape[-1]
        if biased:
            rows: list[int] = []
            cols: list[int] = []
            vals: list[float] = []
            for b in biased:  # list extends: C speed, however many tokens a request biases
                bias = params[b].logit_bias
                rows += [b] * len(bias)
                cols += bias.keys()
                vals += bias.values()
            out_BV.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                              torch.tensor(vals, device=dev, dtype=torch.float32), accumulate=True)
        width = max((len(outputs[b]) for b in penalised), default=0)
        if width:
            # token counts by scatter-add over the outputs, right-padded with an extra column V
            ids = torch.tensor([outputs[b] + [vocab] * (width - len(outputs[b])) for b in penalised], device=dev)
            counts_PV = torch.zeros(len(penalised), vocab + 1, device=dev).scatter_add_(
                1, ids, torch.ones(ids.shape, device=dev))[:, :vocab]
            freq = torch.tensor([params[b].frequency_penalty for b in penalised], device=dev)[:, None]
            pres = torch.tensor([params[b].presence_penalty for b in penalised], device=dev)[:, None]
            rows_t = torch.tensor(penalised, device=dev)
            out_BV[rows_t] -= freq * counts_PV + pres * (counts_PV > 0)
        return out_BV

    @staticmethod
    def filtered_logits(logits_BV: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """fp32 logits / temperature with everything outside top-k and top-p set to -inf.
        Rows with temperature 0 are returned unscaled (the caller takes their argmax)."""
        logits_BV = logits_BV.float()
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits_BV.device)
        logits_BV = logits_BV / temps[:, None]
        top_ks = [p.top_k for p in params]
        top_ps = [p.top_p for p in params]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            # as transformers and vLLM: top-k first (ties broken by token id), then top-p over the
            # renormalised top-k distribution, keeping the smallest prefix whose mass reaches p
            vocab = logits_BV.shape[-1]
            sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True, stable=True)
            drop_BV = torch.zeros_like(sorted_BV, dtype=torch.bool)  # in sorted order
            if any(k > 0 for k in top_ks):
                k_B = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks], device=logits_BV.device)
                drop_BV |= torch.arange(vocab, device=logits_BV.device)[None] >= k_B[:, None]
            if any(p < 1.0 for p in top_ps):
                p_B = torch.tensor(top_ps, device=logits_BV.device, dtype=torch.float32)
                probs_BV = sorted_BV.masked_fill(drop_BV, float("-inf")).softmax(dim=-1)
                before_BV = probs_BV.cumsum(dim=-1) - probs_BV  # mass ahead of each entry; the first's is 0
                drop_BV |= (before_BV >= p_B[:, None]) & (p_B < 1.0)[:, None]
            logits_BV = logits_BV.masked_fill(torch.zeros_like(drop_BV).scatter(1, order_BV, drop_BV), float("-inf"))
        return logits_BV

    def noise(self, shape: tuple[int, ...], gens: list[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) noise [B, *shape]; row i from gens[i] when it has one, else the engine's."""
        out = torch.empty(len(gens), *shape, device=self.device)
        shared = [i for i, g in enumerate(gens) if g is None]
        if len(shared) == len(gens):
            return out.exponential_(generator=self.generator)
        if shared:
            out[shared] = torch.empty(len(shared), *shape, device=self.device).exponential_(generator=self.generator)
        for i, g in enumerate(gens):
            if g is not None:
                out[i].exponential_(generator=g)
        return out

    def uniform(self, gens: list[torch.Generator | None]) -> torch.Tensor:
        """U(0, 1) [B], per-row generators as in `noise`."""
        return (-self.noise((), gens)).exp()  # exp(-E) with E ~ Exp(1) is uniform on (0, 1]

    def logprobs(self, logits_BV: torch.Tensor, params: list[SamplingParams], tokens_B: torch.Tensor, top_n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities under the distribution each row samples from (adjusted logits /
        temperature, 1 for greedy rows, with top-k/top-p applied: filtered tokens are -inf).
        -> (of tokens_B [B], the top_n largest [B, N], their ids [B, N]); all fp32/int64 on the device."""
        logp_BV = self.filtered_logits(logits_BV, params).log_softmax(dim=-1)
        chosen_B = logp_BV.gather(1, tokens_B[:, None])[:, 0]
        top_BN, ids_BN = logp_BV.topk(min(top_n, logp_BV.shape[-1]), dim=-1)
        return chosen_B, top_BN, ids_BN

    # ------------------------------------------------------------------ sampling
    def sample(self, logits_BV: torch.Tensor, params: list[SamplingParams],
               gens: list[torch.Generator | None]) -> torch.Tensor:
        """logits [B, V] -> token ids [B] (int64, on the device; no host sync)."""
        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits_BV.argmax(dim=-1)
        filt_BV = self.filtered_logits(logits_BV, params)
        probs_BV = filt_BV.softmax(dim=-1)
        sampled_B = (probs_BV / self.noise((logits_BV.shape[-1],), gens)).argmax(dim=-1)
        if any(greedy):
            sampled_B = torch.where(torch.tensor(greedy, device=logits_BV.device), logits_BV.argmax(dim=-1), sampled_B)
        return sampled_B

    def verify(self, logits_BTV: torch.Tensor, draft_B: torch.Tensor, params: list[SamplingParams],
               gens: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Speculative verification of one drafted token per row.

        logits [B, 2, V]: the main model at the last committed token (predicting the draft's
        position) and at the draft (predicting the one after). -> (first [B], second [B],
        accepted [B] bool). `first` is always valid; `second` only where accepted.

        Greedy rows accept iff the draft is the argmax, so their output is exactly the output
        without speculation. Sampled rows use the speculative sampling rule (Leviathan et al.
        2023; Chen et al. 2023) for a deterministic draft q = onehot(d): accept with probability
        min(1, p(d)/q(d)) = p(d), else resample from max(0, p - q) normalised, i.e. p with d
        removed -- which leaves every token's probability exactly p.
        """
        greedy = [p.greedy for p in params]
        argmax_BT = logits_BTV.argmax(dim=-1)
        if all(greedy):
            return argmax_BT[:, 0], argmax_BT[:, 1], argmax_BT[:, 0] == draft_B
        b, t, v = logits_BTV.shape
        per_row = [p for p in params for _ in range(t)]
        filt_BTV = self.filtered_logits(logits_BTV.reshape(b * t, v), per_row).view(b, t, v)
        probs_BTV = filt_BTV.softmax(dim=-1)
        p_draft_B = probs_BTV[:, 0].gather(1, draft_B[:, None])[:, 0]
        accept_B = self.uniform(gens) <= p_draft_B
        residual_BV = probs_BTV[:, 0].scatter(1, draft_B[:, None], 0.0)
        noise_BTV = self.noise((t, v), gens)
        resampled_B = (residual_BV / noise_BTV[:, 0]).argmax(dim=-1)
        second_B = (probs_BTV[:, 1] / noise_BTV[:, 1]).argmax(dim=-1)
        first_B = torch.where(accept_B, draft_B, resampled_B)
        if any(greedy):
            g = torch.tensor(greedy, device=logits_BTV.device)
            first_B = torch.where(g, argmax_BT[:, 0], first_B)
            second_B = torch.where(g, argmax_BT[:, 1], second_B)
            accept_B = torch.where(g, argmax_BT[:, 0] == draft_B, accept_B)
        return first_B, second_B, accept_B
