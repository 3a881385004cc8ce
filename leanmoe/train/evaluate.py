"""What the trainer measures on held-out text: validation loss and bits per byte over fixed
windows, and short seeded samples decoded through the latent cache (the absorbed MLA path).

In a distributed run every rank evaluates its share of the same windows and the sums are
all-reduced; sampling runs in lockstep on every rank (rank 0's token is broadcast each step), so
every rank runs the same forward passes."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leanmoe.data.loader import eval_batches
from leanmoe.model import LatentCache, Transformer
from leanmoe.parallel.world import World

__all__ = ["validation_loss", "sample", "evaluate"]


@torch.no_grad()
def validation_loss(model: Transformer, val_tokens: np.ndarray, token_bytes: list[int], *, batch_size: int,
                    seq_len: int, max_batches: int, device: torch.device, world: World,
                    autocast=contextlib.nullcontext) -> tuple[float, float, torch.Tensor, int]:
    """(mean loss in nats/token, bits per UTF-8 byte, the first batch's input ids, tokens scored on
    all ranks) over at most `max_batches` batches of fixed windows (at least one per rank). Special
    tokens (0 bytes) count in the loss but not in bits per byte."""
    byte_len = torch.as_tensor(np.asarray(token_bytes), device=device)
    nats = bpb_nats = 0.0
    count = n_bytes = 0
    batches = list(eval_batches(val_tokens, batch_size, seq_len, max(max_batches, world.size), rank=world.rank,
                                world_size=world.size))
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nats += loss.sum().item()
        count += loss.numel()
        b = byte_len[y.flatten()]
        bpb_nats += (loss * (b > 0)).sum().item()
        n_bytes += int(b.sum().item())
    sums = world.all_reduce_sum(torch.tensor([nats, count, bpb_nats, n_bytes], dtype=torch.float64, device=device))
    nats, count, bpb_nats, n_bytes = sums.tolist()
    # prompts for samples: rank 0's first batch on every rank (decoding runs in lockstep)
    first = batches[0][0] if world.rank == 0 else next(eval_batches(val_tokens, batch_size, seq_len, 1))[0]
    return nats / max(count, 1), bpb_nats / math.log(2) / max(n_bytes, 1), first, int(count)


@torch.no_grad()
def sample(model: Transformer, prompt: list[int], n_tokens: int, device: torch.device, world: World,
           eos_id: int | None = None, seed: int = 0, temperature: float = 0.8, top_k: int = 40) -> list[int]:
    """Up to `n_tokens` token ids after `prompt`: top-k sampling with a seeded CPU generator,
    cached decoding through a LatentCache; stops at `eos_id`."""
    cache = LatentCache(model.config, 1, len(prompt) + n_tokens, device, next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    pos = 0
    for _ in range(n_tokens):
        logits = model(ids, position_ids=torch.arange(pos, pos + ids.shape[1], device=device)[None],
                       backend=cache)[0, -1].float()
        cache.advance(ids.shape[1])
        pos += ids.shape[1]
        top = logits.topk(min(top_k, logits.numel()))
        probs = (top.values / temperature).softmax(-1).cpu()
        nxt = int(top.indices[torch.multinomial(probs, 1, generator=gen)].item())
        nxt = int(world.broadcast_float(float(nxt)))  # every rank decodes rank 0's token
        if nxt == eos_id:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]], device=device)
    return out


def evaluate(model: Transformer, tokenizer, val_tokens: np.ndarray, *, batch_size: int, seq_len: int,
             max_batches: int, sample_tokens: int, seed: int, device: torch.device, world: World,
             autocast=contextlib.nullcontext, n_samples: int = 3) -> dict[str, Any]:
    """{"val_loss", "val_bpb", "val_tokens", "samples": [{"prompt", "completion"}, ...]}: the
    validation loss over "val_tokens" scored tokens (all ranks together) and up to `n_samples`
    completions of the first 8 tokens of the first validation windows. The model is put back in
    training mode."""
    model.eval()
    try:
        val_loss, val_bpb, prompts, n_scored = validation_loss(model, val_tokens, tokenizer.token_bytes(),
                                                               batch_size=batch_size, seq_len=seq_len,
                                                               max_batches=max_batches, device=device, world=world,
                                                               autocast=autocast)
        samples = []
        for i in range(min(n_samples, prompts.shape[0])):
            prompt = prompts[i, :8].tolist()
            out = sample(model, prompt, sample_tokens, device, world, tokenizer.eos_id, seed=seed + i)
            samples.append({"prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(out)})
    finally:
        model.train()
    return {"val_loss": val_loss, "val_bpb": val_bpb, "val_tokens": n_scored, "samples": samples}
