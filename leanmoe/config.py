"""Model configuration: one dataclass, Hugging Face DeepseekV3 field names, presets as data.

`ModelConfig` is the only description of a model. Its field names are the ones DeepSeek's own
`config.json` files and transformers' `DeepseekV3Config` use, so a config moves between leanmoe,
transformers, vLLM and SGLang unchanged. It also owns the parameter and FLOP accounting that every
cost and MFU figure in leanmoe is built on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelConfig", "ParamCounts", "PRESETS", "ConfigError"]

_SCORING_FUNCS = ("sigmoid", "softmax")
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")

# Sanity bounds, far above any published model (DeepSeek-V3: hidden 7168, 61 layers, 256 experts,
# vocab 129280, 163840 positions) and low enough that a mistyped size ("hidden_size": 1e12) is
# refused before anything is allocated. _MAX_PARAMS bounds the sizes' product (Kimi K2: ~1.04T).
_LIMITS = {"vocab_size": 2**24, "hidden_size": 2**17, "intermediate_size": 2**20, "num_hidden_layers": 2**12,
           "num_attention_heads": 2**12, "q_lora_rank": 2**17, "kv_lora_rank": 2**17, "qk_nope_head_dim": 2**12,
           "qk_rope_head_dim": 2**12, "v_head_dim": 2**12, "max_position_embeddings": 2**24,
           "moe_intermediate_size": 2**20, "n_shared_experts": 2**10, "n_routed_experts": 2**16,
           "num_experts_per_tok": 2**16, "first_k_dense_replace": 2**13, "n_group": 2**16, "topk_group": 2**16,
           "num_nextn_predict_layers": 2**6}
_MAX_PARAMS = 10**13


class ConfigError(ValueError):
    """A config that cannot describe a model. One line: where it came from (`source`: a config.json
    path, or "ModelConfig"), then what is wrong; `field` names the offending field (None when
    several are to blame together)."""

    def __init__(self, detail: str, field: str | None = None, source: str = "ModelConfig"):
        super().__init__(f"{source}: {detail}")
        self.detail, self.field, self.source = detail, field, source

    def at(self, source: str | Path) -> ConfigError:
        """The same error, said of `source` (e.g. the config.json it was read from)."""
        return ConfigError(self.detail, self.field, str(source))


def _field_kinds() -> dict[str, tuple[type, bool]]:
    """field name -> (base type, accepts None), from ModelConfig's annotations."""
    kinds = {}
    for name, hint in typing.get_type_hints(ModelConfig).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        base = next(a for a in args if a is not type(None))
        kinds[name] = (typing.get_origin(base) or base, type(None) in args)
    return kinds


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a config (numbers of scalars, not bytes).

    total: the main model (embedding, layers, final norm, head); excludes MTP modules, as
        DeepSeek's "671B" does.
    activated: parameters touched by one token in the main model (shared + top-k routed experts).
    embedding: input embedding plus output head (counted once when tied); part of `total`.
    mtp: the MTP modules, excluding the embedding and head they share with the main model.
    """

    total: int
    activated: int
    embedding: int
    mtp: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass
class ModelConfig:
    """A DeepSeek-V3-style model. Field names follow Hugging Face `DeepseekV3Config`.

    Shapes use: D = hidden_size, H = num_attention_heads, C = kv_lora_rank, R = qk_rope_head_dim,
    E = n_routed_experts, K = num_experts_per_tok.
    """

    # vocabulary and trunk
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 61
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    # mla (multi-head latent attention, DeepSeek-V2 section 2.1)
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: a plain q_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # rope / yarn
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor": ..., ...}
    max_position_embeddings: int = 4096

    # moe (DeepSeekMoE; V3 section 2.1.2)
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"

    # mtp (multi-token prediction; V3 section 2.2)
    num_nextn_predict_layers: int = 1

    # training knobs (not architecture; saved in config.json, ignored by other libraries)
    bias_update_speed: float = 1e-3  # gamma of aux-loss-free balancing (V3 section 2.1.2)
    aux_loss_alpha: float = 1e-4  # weight of the sequence-wise balance loss; 0 disables it
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss (V3 uses 0.3, then 0.1)
    # NOTE: FP8 training is not a model field: leanmoe.train.fp8.convert_to_fp8 applies it to a
    # built model. An older config.json's "fp8" key is ignored like any unknown key (a plain model).

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ checks
    def _check_types(self) -> None:
        """Each field against its annotation. An integral float (7168.0, 1e3) becomes an int and an int
        a float where a float is due; bools, strings, lists and non-finite numbers are refused."""
        global _KINDS
        if _KINDS is None:
            _KINDS = _field_kinds()
        for name, (base, nullable) in _KINDS.items():
            v = getattr(self, name)
            if v is None:
                if not nullable:
                    raise ConfigError(f"{name} must not be null", name)
                continue
            if base is bool:
                ok = isinstance(v, bool)
                want = "true or false"
            elif base is int:
                if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                    v = int(v)
                    setattr(self, name, v)
                ok = isinstance(v, int) and not isinstance(v, bool)
                want = "an integer"
            elif base is float:
                ok = _is_number(v) and math.isfinite(v)
                if ok:
                    setattr(self, name, float(v))
                want = "a finite number"
            else:
                ok, want = isinstance(v, base), {str: "a string", dict: "an object"}.get(base, base.__name__)
            if not ok:
                raise ConfigError(f"{name} must be {want}{' or null' if nullable else ''}, got {v!r}", name)

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the field when the config cannot describe a model:
        a value of the wrong type, a size out of range, sizes that do not fit together, or sizes
        whose product is beyond any machine (checked before anything is allocated)."""

        def need(cond: bool, msg: str, field: str | None) -> None:
            if not cond:
                raise ConfigError(msg, field)

        self._check_types()
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}", name)
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}", name)
        for name, limit in _LIMITS.items():
            v = getattr(self, name)
            need(v is None or v <= limit, f"{name}={v} is beyond any real model (leanmoe accepts up to {limit:,})",
                 name)
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}", "qk_rope_head_dim")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be positive or null, got {self.q_lora_rank}", "q_lora_rank")
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}", name)
        for name in ("initializer_range", "bias_update_speed", "aux_loss_alpha", "mtp_loss_weight"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}", name)
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            need(v is None or 0 <= v < self.vocab_size,
                 f"{name}={v} is not a token id of a {self.vocab_size}-token vocabulary", name)
        need(self.scoring_func in _SCORING_FUNCS,
             f"scoring_func must be one of {_SCORING_FUNCS}, got {self.scoring_func!r}", "scoring_func")
        need(self.hidden_act == "silu", f"only hidden_act='silu' is supported, got {self.hidden_act!r}", "hidden_act")
        if self.has_moe:
            need(self.n_routed_experts > 0, f"n_routed_experts must be positive, got {self.n_routed_experts}",
                 "n_routed_experts")
            need(self.moe_intermediate_size > 0,
                 f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}", "moe_intermediate_size")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts="
                 f"{self.n_routed_experts}]", "num_experts_per_tok")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}", "n_group")
            need(1 <= self.topk_group <= self.n_group,
                 f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]", "topk_group")
            per_group = self.n_routed_experts // self.n_group
            need(self.num_experts_per_tok <= self.topk_group * per_group,
                 f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in the "
                 f"{self.topk_group} selected groups ({self.topk_group * per_group})", "num_experts_per_tok")
            need(self.n_group == 1 or self.scoring_func != "sigmoid" or per_group >= 2,
                 "sigmoid routing with groups scores each group by its top-2 experts: "
                 "n_routed_experts / n_group must be >= 2", "n_group")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "default", None),
                 f"rope_scaling type {kind!r} is not supported (only 'yarn')", "rope_scaling")
            if kind == "yarn":
                need("factor" in rs and "original_max_position_embeddings" in rs,
                     "yarn rope_scaling needs 'factor' and 'original_max_position_embeddings'", "rope_scaling")
            for key in _ROPE_KEYS:
                if key in rs:
                    v = rs[key]
                    need(_is_number(v) and math.isfinite(v) and v > 0,
                         f"rope_scaling.{key} must be a positive number, got {v!r}", "rope_scaling")
        n = self.num_params()
        need(n.total + n.mtp <= _MAX_PARAMS,
             f"these sizes make a model of {_fmt(n.total + n.mtp)} parameters ({_fmt(2 * (n.total + n.mtp))}B in "
             f"bf16), beyond the {_fmt(_MAX_PARAMS)} leanmoe accepts; check hidden_size, num_hidden_layers, "
             "n_routed_experts, moe_intermediate_size, intermediate_size and vocab_size", None)

    # ------------------------------------------------------------------ derived shapes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers + self.num_nextn_predict_layers

    @property
    def yarn(self) -> dict[str, Any] | None:
        """The YaRN parameters, or None when rope is unscaled."""
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) not in ("yarn",):
            return None
        return rs

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP modules continue the numbering) uses DeepSeekMoE, else a dense MLP."""
        return layer_idx >= self.first_k_dense_replace

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer by the absorbed MLA path: C + R (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ------------------------------------------------------------------ accounting
    def _attention_params(self) -> int:
        d, h = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = d * h * self.qk_head_dim
        else:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        kv = d * self.latent_dim + self.kv_lora_rank + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    def _expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    def _layer_params(self, layer_idx: int) -> tuple[int, int]:
        """(total, activated) parameters of one decoder block."""
        base = self._attention_params() + 2 * self.hidden_size  # + input/post-attention norms
        if not self.is_moe_layer(layer_idx):
            mlp = 3 * self.hidden_size * self.intermediate_size
            return base + mlp, base + mlp
        router = self.n_routed_experts * self.hidden_size
        shared = self.n_shared_experts * self._expert_params()
        total = base + router + shared + self.n_routed_experts * self._expert_params()
        active = base + router + shared + self.num_experts_per_tok * self._expert_params()
        return total, active

    def num_params(self) -> ParamCounts:
        """Parameter counts from the shapes alone (no model is built). See `ParamCounts`."""
        d, v = self.hidden_size, self.vocab_size
        embedding = v * d * (1 if self.tie_word_embeddings else 2)
        total = active = embedding + d  # + final norm
        for i in range(self.num_hidden_layers):
            t, a = self._layer_params(i)
            total, active = total + t, active + a
        mtp = 0
        for k in range(self.num_nextn_predict_layers):
            # enorm, hnorm, eh_proj [D, 2D], shared_head.norm, and one block
            mtp += 3 * d + 2 * d * d + self._layer_params(self.num_hidden_layers + k)[0]
        return ParamCounts(total=total, activated=active, embedding=embedding, mtp=mtp)

    def flops_per_token(self, seq_len: int, include_mtp: bool = True) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 x the activated matmul parameters (the embedding lookup is not a matmul; the output head
        is, tied or not) plus causal attention: per layer, Q.K^T and P.V cost 2*H*(d_qk + d_v)
        FLOPs per key in the forward pass, a query sees on average seq_len/2 keys, and backward
        costs twice the forward, so 3 * H * (d_qk + d_v) * seq_len per layer. With MTP modules,
        their blocks, eh_proj and their pass through the shared head are added.
        """
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        d, v, h = self.hidden_size, self.vocab_size, self.num_attention_heads
        norms_per_block = 2 * d + self.kv_lora_rank + (self.q_lora_rank or 0)
        attn = 3 * h * (self.qk_head_dim + self.v_head_dim) * seq_len

        def block_matmul_flops(i: int) -> float:
            return 6 * (self._layer_params(i)[1] - norms_per_block) + attn

        flops = 6 * v * d  # output head
        flops += sum(block_matmul_flops(i) for i in range(self.num_hidden_layers))
        if include_mtp:
            for k in range(self.num_nextn_predict_layers):
                flops += 6 * (2 * d * d + v * d) + block_matmul_flops(self.num_hidden_layers + k)
        return float(flops)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from an HF `config.json` dict, as DeepSeek's releases or transformers v5 write it.

        Keys this class does not know (architectures, torch_dtype, quantization_config, ...) are
        ignored. transformers v5's `rope_parameters` and `num_mtp_layers` are mapped back.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of fields, got {type(d).__name__} "
                              f"{json.dumps(d)[:40]}")
        d = dict(d)
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict) and rp:
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp["rope_theta"])
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind not in (None, "default") and not d.get("rope_scaling"):
                d["rope_scaling"] = {"type": kind, **{k: rp[k] for k in _ROPE_KEYS if k in rp}}
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            kind = rs.get("type", rs.get("rope_type"))
            d["rope_scaling"] = None if kind in (None, "default") else {"type": kind, **{k: rs[k] for k in _ROPE_KEYS if k in rs}}
        if isinstance(d.get("eos_token_id"), list):  # generation configs list several; the first is eos
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
        for k in ("n_group", "topk_group"):  # null in a config means no group-limited routing
            if k in d and d[k] is None:
                d[k] = 1
        nullable = {"q_lora_rank", "rope_scaling", "bos_token_id", "eos_token_id"}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and (v is not None or k in nullable)})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint folder (or the file itself). Raises ConfigError (a
        ValueError) whose one line names the file and the field."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json at {p}: point at an HF-layout checkpoint folder")
        try:
            d = json.loads(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"not UTF-8 text (byte {e.start}); is it a config.json?", None, str(p)) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", None, str(p)) from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise e.at(p) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain field dict (round-trips through `ModelConfig(**d)`)."""
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` written next to weights: readable by DeepSeek's remote code, vLLM,
        SGLang and transformers v5 (which reads `rope_parameters`; older readers `rope_scaling`)."""
        d = self.to_dict()
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.yarn:
            rope_parameters = {**{k: v for k, v in self.yarn.items() if k != "type"}, "rope_type": "yarn",
                               "type": "yarn", "rope_theta": self.rope_theta}
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            num_key_value_heads=self.num_attention_heads,
            rope_parameters=rope_parameters,
            rope_interleave=True,
            topk_method="noaux_tc",
            attention_bias=False,
            attention_dropout=0.0,
            moe_layer_freq=1,
            ep_size=1,  # DeepSeek's remote code reads it
            pretraining_tp=1,
            pad_token_id=None,  # SGLang reads it unconditionally
            use_cache=True,
        )
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def summary(self) -> str:
        """A few human lines: shape and parameter counts."""
        n = self.num_params()
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        return (
            f"{self.num_hidden_layers} layers ({moe_layers} MoE), hidden {self.hidden_size}, "
            f"{self.num_attention_heads} heads, MLA latent {self.kv_lora_rank}+{self.qk_rope_head_dim}, "
            f"{self.n_routed_experts} routed experts (top-{self.num_experts_per_tok}) + {self.n_shared_experts} shared, "
            f"vocab {self.vocab_size}, MTP depth {self.num_nextn_predict_layers}\n"
            f"params: {_fmt(n.total)} total, {_fmt(n.activated)} activated, {_fmt(n.embedding)} embedding, "
            f"{_fmt(n.mtp)} MTP"
        )


_KINDS: dict[str, tuple[type, bool]] | None = None  # filled on first use (the annotations are strings)


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in about ten minutes: ~12M total, ~5M activated, 32 routed experts.
    # 8 heads over a 64+16 latent: the latent cache is 8x smaller than expanded per-head K/V.
    # Fine-grained experts as in DeepSeekMoE (32 of width 64, top-4, 2 shared): in 5-minute CPU runs
    # (docs/benchmarks.md) 2.224 val bits/byte against 2.264 for 16 of width 128 top-2 + 1 shared
    # (the same total and activated parameters) and 2.258 for the dense twin; 64 of width 32 top-8
    # was slower and worse (2.273).
    "tiny": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
        moe_intermediate_size=64, n_shared_experts=2, n_routed_experts=32, num_experts_per_tok=4,
        # no group-limited routing: it bounds cross-device traffic, and on one device it only narrows
        # the choice (5-minute screen: 0.022 lower val bits/byte, 5% more tokens/s; docs/benchmarks.md)
        first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        # no MTP module: at this size it costs a quarter of every step and is worth ~0.01 val bits/byte
        # per step; without it a 10-minute CPU run takes ~1.3x the steps and ends lower (docs/benchmarks.md)
        num_nextn_predict_layers=0,
        bias_update_speed=0.01,  # runs of a few hundred steps: V3's 1e-3 would balance too slowly
    ),
    # A single-GPU model: ~0.6B total, ~0.15B activated.
    "small": dict(
        vocab_size=32768, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
        moe_intermediate_size=384, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
    ),
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated): softmax routing, no q compression.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        moe_intermediate_size=1408, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, scoring_func="softmax", num_nextn_predict_layers=0, bos_token_id=100000,
        eos_token_id=100001,
    ),
    # DeepSeek-V3 / R1 (671B total, 37B activated, one 11.5B MTP module).
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rope_scaling=_V3_YARN,
        moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
        first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, scoring_func="sigmoid", num_nextn_predict_layers=1,
    ),
}
