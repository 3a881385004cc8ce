"""The DeepSeek-V3 transformer: decoder blocks, multi-token prediction modules, loss.

Shape legend: B batch, T tokens, D hidden, V vocabulary.

Module names reproduce the HF DeepseekV3 checkpoint (`model.embed_tokens`, `model.layers.{i}`,
`model.norm`, `lm_head`), with MTP module k stored as `model.layers.{num_hidden_layers + k}`
as in DeepSeek's release, so `state_dict()` keys are HF keys apart from the stacked experts
(see leanmoe.weights).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanmoe.config import ModelConfig
from leanmoe.model.attention import MLA, AttentionBackend
from leanmoe.model.layers import MLP, RMSNorm, RotaryEmbedding
from leanmoe.model.moe import MoE, Router


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x)). Dense MLP or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] -> (x [B, T, D], balance loss of this layer or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(h)
        else:
            h, aux = self.mlp(h), None
        return x + h, aux


class SharedHead(nn.Module):
    """`shared_head` of an MTP module: its own final norm (the head itself is the model's)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """Multi-token prediction module k (V3 section 2.2): combines the previous depth's hidden
    state at position i with the embedding of token i+k and runs one block; predicts token i+k+1.

        h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_{i}^{k-1})]);  h^k = Block(h')
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward_mtp(self, emb: torch.Tensor, h_prev: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    backend: AttentionBackend | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """emb, h_prev [B, T, D] (aligned: emb of token i+k next to h of position i) -> (h^k, aux)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.forward(x, cos, sin, backend)


class Model(nn.Module):
    """The trunk (`model.` in HF names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        blocks = [Block(cfg, i) for i in range(cfg.num_hidden_layers)]
        mtp = [MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(blocks + mtp)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


@dataclass
class LossOutput:
    """loss = lm_loss + mtp_loss + aux_loss (all scalars). mtp_losses: per depth, unweighted."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor
    aux_loss: torch.Tensor
    mtp_losses: list[torch.Tensor]
    logits: torch.Tensor | None = None


def _generator(seed: int, key: str) -> torch.Generator:
    """A CPU generator for one parameter: (seed, key) -> a 63-bit seed (stable across runs)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return torch.Generator(device="cpu").manual_seed((seed ^ h) % 2**63)


def _sum_aux(aux: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    terms = [a for a in aux if a is not None]
    return torch.stack(terms).sum() if terms else like.new_zeros(())


class Transformer(nn.Module):
    """DeepSeek-V3: MLA + DeepSeekMoE + MTP. `model(input_ids)` returns logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # the init seed is the first draw after torch.manual_seed, before the submodules'
        # constructors consume the generator (they do not on the meta device)
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.config = cfg
        self.model = Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights(seed)

    # ------------------------------------------------------------------ structure
    @property
    def blocks(self) -> list[Block]:
        return list(self.model.layers[: self.config.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def moe_layers(self) -> list[MoE]:
        """Every MoE of the model, MTP modules included, in layer order."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """N(0, initializer_range) for matrices and embeddings; projections that write into the
        residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * layers) (GPT-2); norms at 1.

        Each parameter (each expert of a stacked expert weight) draws from its own generator,
        seeded by `seed` and its name (`initial_value`), so a model built in pieces, as
        `leanmoe.parallel.parallelize.materialize` does on each rank, gets exactly the weights
        of one built whole. seed: default drawn from torch's global generator, so
        `torch.manual_seed` decides it. Parameters on the meta device are skipped."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu"))
        for name, p in self.named_parameters():
            if isinstance(p, torch.Tensor) and p.device.type == "meta":
                continue
            p.copy_(self.initial_value(name, tuple(p.shape), seed))
        for m in self.modules():
            if isinstance(m, Router) and m.e_score_correction_bias.device.type != "meta":
                m.e_score_correction_bias.zero_()
        self.reset_buffers()

    def initial_value(self, name: str, shape: tuple[int, ...], seed: int, experts: range | None = None) -> torch.Tensor:
        """The initial value (fp32, CPU) of parameter `name`, whose full shape is `shape`; for a
        stacked expert weight ([E, ...]) only the experts in `experts` (default all)."""
        std = self.config.initializer_range
        if len(shape) == 1:
            return torch.ones(shape, device="cpu")  # RMSNorm weights
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            std /= math.sqrt(2 * (self.config.num_hidden_layers + self.config.num_nextn_predict_layers))
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows = range(shape[0]) if experts is None else experts
            out = torch.empty(len(rows), *shape[1:], device="cpu")
            for j, e in enumerate(rows):
                out[j].normal_(0.0, std, generator=_generator(seed, f"{name}[{e}]"))
            return out
        return torch.empty(shape, device="cpu").normal_(0.0, std, generator=_generator(seed, name))

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build non-persistent buffers (rope tables, load counters), e.g. after loading
        weights into a model created on the meta device."""
        if device is None:
            device = self.model.embed_tokens.weight.device
        self.model.rotary_emb.reset_buffers(device)
        for moe in self.moe_layers():
            moe.tokens_per_expert = torch.zeros(moe.n_experts, device=device)

    # ------------------------------------------------------------------ forward
    def _positions(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return position_ids

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      backend: AttentionBackend | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, T] -> (final-normed hidden [B, T, D], summed balance loss)."""
        cos, sin = self.model.rotary_emb(self._positions(input_ids, position_ids))
        x = self.model.embed_tokens(input_ids)
        aux = []
        for block in self.blocks:
            x, a = block(x, cos, sin, backend)
            aux.append(a)
        return self.model.norm(x), _sum_aux(aux, x)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                backend: AttentionBackend | None = None) -> torch.Tensor:
        """input_ids [B, T] (int64) -> logits [B, T, V]. position_ids [B, T] default 0..T-1;
        `backend` holds past tokens' latents for cached decoding (absorbed MLA)."""
        h, _ = self.hidden_states(input_ids, position_ids, backend)
        return self.lm_head(h)

    def mtp_step(self, k: int, h_prev: torch.Tensor, next_ids: torch.Tensor,
                 position_ids: torch.Tensor, backend: AttentionBackend | None = None):
        """Run MTP module k (1-based) on h_prev [B, T, D] and the ids of the tokens one step
        ahead next_ids [B, T] -> (h^k [B, T, D], logits [B, T, V], balance loss)."""
        layer = self.mtp_layers[k - 1]
        cos, sin = self.model.rotary_emb(position_ids)
        h, aux = layer.forward_mtp(self.model.embed_tokens(next_ids), h_prev, cos, sin, backend)
        return h, self.lm_head(layer.shared_head.norm(h)), aux

    def compute_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, mtp_weight: float | None = None,
                     return_logits: bool = False) -> LossOutput:
        """Next-token cross-entropy plus the MTP and balance losses.

        input_ids, targets [B, T] (targets[:, i] is the token after input_ids[:, i]; -100 is
        ignored). MTP depth k predicts targets[:, i + k] from position i; the MTP loss is
        mtp_weight / depth * sum_k CE_k (V3 eq. 25), mtp_weight defaulting to the config's.
        """
        cfg = self.config
        if input_ids.shape != targets.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} differ")
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)[None]
        h, aux = self.hidden_states(input_ids, pos)
        logits = self.lm_head(h)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100)
        mtp_losses: list[torch.Tensor] = []
        h_prev = h
        for k in range(1, cfg.num_nextn_predict_layers + 1):
            if t - k <= 0:
                break
            h_prev, logits_k, a = self.mtp_step(k, h_prev[:, : t - k], input_ids[:, k:], pos[:, : t - k])
            mtp_losses.append(F.cross_entropy(logits_k.flatten(0, 1).float(), targets[:, k:].reshape(-1),
                                              ignore_index=-100))
            if a is not None:
                aux = aux + a
        weight = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
        mtp_loss = weight * torch.stack(mtp_losses).mean() if mtp_losses else lm_loss.new_zeros(())
        return LossOutput(loss=lm_loss + mtp_loss + aux, lm_loss=lm_loss, mtp_loss=mtp_loss, aux_loss=aux,
                          mtp_losses=mtp_losses, logits=logits if return_logits else None)

    # ------------------------------------------------------------------ load balancing
    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last bias update: [n_moe_layers, E] float."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.tokens_per_expert for m in layers])

    @torch.no_grad()
    def update_router_bias(self, speed: float | None = None, load: torch.Tensor | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step: move every router bias by speed * sign(mean - load),
        then reset the counters. `load` [n_moe_layers, E] overrides the local counts (a
        distributed trainer passes the all-reduced ones). Returns the load used."""
        speed = self.config.bias_update_speed if speed is None else speed
        load = self.expert_load() if load is None else load
        for moe, layer_load in zip(self.moe_layers(), load):
            moe.update_bias(layer_load, speed)
            moe.tokens_per_expert.zero_()
        return load

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
