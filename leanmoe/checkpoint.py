"""Weights in the Hugging Face DeepseekV3 layout: safetensors only, never pickle.

Written: `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`), routed experts one by one
(`model.layers.3.mlp.experts.17.gate_proj.weight`), MTP module k at
`model.layers.{num_hidden_layers + k - 1}` with copies of the shared embedding and head, as
DeepSeek's release does, so vLLM and SGLang find them.

Read, besides that: transformers v5's fused experts (`mlp.experts.gate_up_proj` [E, 2F, D],
`mlp.experts.down_proj` [E, D, F]) and FP8 checkpoints whose e4m3 weights carry
`weight_scale_inv` (one scale per 128x128 block, dequantised on load).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leanmoe.config import ModelConfig
from leanmoe.model.transformer import Transformer

__all__ = ["save_pretrained", "from_pretrained", "resolve_checkpoint", "hf_state_dict", "load_hf_state_dict",
           "dequantize_fp8_blocks", "CheckpointReader"]

_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_MTP_SHARED_RE = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")
_FP32_KEYS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # router stays fp32 (as in HF)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# ---------------------------------------------------------------------------- naming
def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF DeepseekV3 names (experts split one by one), detached CPU
    copies that own their memory (safetensors refuses tensors sharing storage)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not name.endswith(_FP32_KEYS):
            t = t.to(dtype)
        out[name] = t.to("cpu", copy=True).contiguous()

    for name, t in model.state_dict().items():
        if name.endswith("tokens_per_expert"):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = _FUSED_RE.match(name)
        if m is None:
            put(name, t)
            continue
        prefix, kind = m.groups()
        f = t.shape[-1] if kind == "down_proj" else t.shape[1] // 2
        for e in range(t.shape[0]):
            if kind == "down_proj":
                put(f"{prefix}.{e}.down_proj.weight", t[e])
            else:
                put(f"{prefix}.{e}.gate_proj.weight", t[e, :f])
                put(f"{prefix}.{e}.up_proj.weight", t[e, f:])
    for k in range(cfg.num_nextn_predict_layers):
        j = cfg.num_hidden_layers + k
        put(f"model.layers.{j}.embed_tokens.weight", model.model.embed_tokens.weight)
        put(f"model.layers.{j}.shared_head.head.weight", model.lm_head.weight)
    return out


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek FP8 weights: w [N, K] e4m3, scale_inv [ceil(N/128), ceil(K/128)] -> fp32 w * s."""
    n, k = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path} (expected {SINGLE_NAME} or {INDEX_NAME})")
    return files


def _has_layer(path: Path, layer: int) -> bool:
    prefix = f"model.layers.{layer}."
    for f in _checkpoint_files(path):
        with safe_open(str(f), framework="pt") as fh:
            if any(k.startswith(prefix) for k in fh.keys()):
                return True
    return False


def iter_checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint folder, shard by shard."""
    for f in _checkpoint_files(path):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


class CheckpointReader:
    """One tensor at a time from a checkpoint folder (sharded or not), by name, without reading
    the rest: `with CheckpointReader(path) as r: w = r.get(name)`. FP8 weights stored with a
    `weight_scale_inv` come back dequantised (fp32)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        for f in _checkpoint_files(self.path):
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    self._where[name] = f
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, name: str):
        if name not in self._where:
            raise KeyError(f"{self.path} has no tensor {name}")
        f = self._where[name]
        if f not in self._open:
            self._open[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        return self._open[f]

    def get(self, name: str) -> torch.Tensor:
        t = self._file(name).get_tensor(name)
        if name + "_scale_inv" in self._where:
            t = dequantize_fp8_blocks(t, self.get(name + "_scale_inv"))
        return t


def load_hf_state_dict(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                       expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Map HF-named tensors onto leanmoe parameter names, checking every name and shape.

    expected: leanmoe name -> shape. Raises ValueError listing missing, unexpected and mis-shaped
    tensors (with both shapes)."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    raw: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, t in items:
        if name.endswith(".weight_scale_inv"):
            scales[name[: -len("_scale_inv")]] = t
        else:
            raw[name] = t
    errors: list[str] = []
    for name, s in scales.items():
        if name not in raw:
            errors.append(f"{name}_scale_inv has no matching weight {name}")
            continue
        raw[name] = dequantize_fp8_blocks(raw[name], s)

    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    unexpected: list[str] = []
    for name, t in raw.items():
        if m := _EXPERT_RE.match(name):
            prefix, e, kind = m.groups()
            experts.setdefault((prefix, kind), {})[int(e)] = t
        elif (m := _MTP_SHARED_RE.match(name)) and int(m.group(1)) >= cfg.num_hidden_layers:
            continue  # MTP copies of the shared embedding / head
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved the rope buffer
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        elif name in expected:
            state[name] = t
        else:
            unexpected.append(name)

    n_experts = cfg.n_routed_experts
    prefixes = sorted({p for p, _ in experts})
    for prefix in prefixes:
        parts = {kind: experts.get((prefix, kind), {}) for kind in ("gate_proj", "up_proj", "down_proj")}
        missing = [f"{prefix}.{e}.{kind}.weight" for kind, d in parts.items() for e in range(n_experts) if e not in d]
        extra = [f"{prefix}.{e}.{kind}.weight" for kind, d in parts.items() for e in d if not 0 <= e < n_experts]
        if missing or extra:
            errors += [f"missing tensor {n}" for n in missing[:8]] + [f"unexpected tensor {n}" for n in extra[:8]]
            continue
        try:
            state[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]], dim=0) for e in range(n_experts)])
            state[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n_experts)])
        except RuntimeError as err:
            errors.append(f"expert weights under {prefix} have inconsistent shapes: {err}")

    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for name, shape in expected.items():
        if name not in state:
            errors.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif state[name].shape != shape:
            errors.append(f"tensor {name} has shape {list(state[name].shape)}, the config expects {list(shape)}")
    errors += [f"unexpected tensor {n} (shape {list(raw[n].shape)})" for n in unexpected]
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError("checkpoint does not match its config:\n  " + "\n  ".join(errors[:20]) + more)
    return state


# ---------------------------------------------------------------------------- public API
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse shard size {size!r}; use bytes or e.g. '5GB', '500MB'")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` to folder `path` in the HF DeepseekV3 layout; returns the folder.

    Each file is written under a temporary name and renamed into place, so an interrupted save
    never leaves a truncated file under a real name; shard files of an earlier save in the same
    folder that this save does not rewrite are removed afterwards.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, dtype)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural_key):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(names, shards):
        tmp = path / f".{fname}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / fname)
    written = set(names)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: fname for fname, shard in zip(names, shards) for n in shard}}
        _write_text(path / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        written.add(INDEX_NAME)
    hf = model.config.to_hf_dict()
    some = next(iter(tensors.values()))
    hf["torch_dtype"] = str(dtype or some.dtype).removeprefix("torch.")
    _write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    return path


def _write_text(p: Path, text: str) -> None:
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The HF-layout folder behind `path`: the folder itself when it holds a config.json, or the
    latest checkpoint of a training run folder (`path/checkpoints/latest`, a symlink or a file
    naming the step folder)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_symlink() or latest.is_dir():
        target = latest.resolve()
    elif latest.is_file():
        target = latest.parent / latest.read_text().strip()
    else:
        if not p.exists():
            raise FileNotFoundError(f"checkpoint folder {p} does not exist")
        raise FileNotFoundError(f"{p} is neither an HF-layout checkpoint (no config.json) nor a training run "
                                "folder (no checkpoints/latest)")
    if not (target / "config.json").is_file():
        raise FileNotFoundError(f"{latest} points at {target}, which holds no config.json")
    return target


def from_pretrained(path: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, config: ModelConfig | None = None) -> Transformer:
    """Load an HF-layout DeepseekV3 checkpoint folder (leanmoe's, transformers', DeepSeek's), or
    the latest checkpoint of a training run folder.

    Weights are cast to `dtype` (the router stays fp32); FP8 block-quantised weights are
    dequantised. `config` overrides the folder's config.json (e.g. to change training knobs).
    Raises FileNotFoundError / ValueError with the offending file or tensor named.
    """
    path = resolve_checkpoint(path)
    cfg = config or ModelConfig.from_pretrained(path)
    if cfg.num_nextn_predict_layers and not _has_layer(path, cfg.num_hidden_layers):
        # transformers saves DeepseekV3 without its MTP module but keeps num_nextn_predict_layers
        warnings.warn(f"{path} has no weights for the {cfg.num_nextn_predict_layers} MTP module(s) its config "
                      "declares; loading the model without MTP", stacklevel=2)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("tokens_per_expert")}
    state = load_hf_state_dict(cfg, iter_checkpoint_tensors(path), expected)
    for name, t in state.items():
        target = torch.float32 if name.endswith(_FP32_KEYS) else dtype
        state[name] = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers(device)
    return model
