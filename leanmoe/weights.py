"""Weights in the Hugging Face DeepseekV3 layout: safetensors only, never pickle.

Written: `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`), routed experts one by one
(`model.layers.3.mlp.experts.17.gate_proj.weight`), MTP module k at
`model.layers.{num_hidden_layers + k - 1}` with copies of the shared embedding and head, as
DeepSeek's release does, so vLLM and SGLang find them.

The head is written even when tied to the embedding: vLLM and SGLang build `lm_head` whatever
`tie_word_embeddings` says and read its weight. `generation_config.json` carries bos/eos ids.

Read, besides that: transformers v5's fused experts (`mlp.experts.gate_up_proj` [E, 2F, D],
`mlp.experts.down_proj` [E, D, F]) and FP8 checkpoints whose e4m3 weights carry
`weight_scale_inv` (one scale per 128x128 block, dequantised on load).

A damaged file (truncated, corrupt header, an index or config that is not what it claims) raises
CheckpointError (a ValueError) in one line naming the file and what is wrong. Files are fsync'ed
before the rename that publishes them, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from leanmoe.config import ModelConfig
from leanmoe.files import CheckpointError, fsync_dir, fsync_file, open_safetensors, read_json, safetensors_error, write_text
from leanmoe.model.transformer import Transformer

__all__ = ["save_pretrained", "from_pretrained", "resolve_checkpoint", "read_latest_pointer", "hf_state_dict",
           "hf_tensors", "load_hf_state_dict", "dequantize_fp8_blocks", "CheckpointReader", "ShardWriter",
           "write_hf_folder", "CheckpointError", "verify_weights", "generation_config", "write_generation_config"]

_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_MTP_SHARED_RE = re.compile(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$")
_FP32_KEYS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")  # router stays fp32 (as in HF)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
GENERATION_CONFIG = "generation_config.json"


# ---------------------------------------------------------------------------- naming
def hf_tensors(cfg: ModelConfig, name: str, t: torch.Tensor, dtype: torch.dtype | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF DeepseekV3 tensors behind one leanmoe state-dict entry (full, single-device shape):
    stacked experts split one by one, the embedding and head also copied to each MTP module
    (the head written even when tied), the load counters left out. Detached CPU copies that own their memory
    (safetensors refuses tensors sharing storage), cast to `dtype` except the fp32 router."""

    def put(hf_name: str, x: torch.Tensor) -> tuple[str, torch.Tensor]:
        x = x.detach()
        if dtype is not None and x.is_floating_point() and not hf_name.endswith(_FP32_KEYS):
            x = x.to(dtype)
        return hf_name, x.to("cpu", copy=True).contiguous()

    if name.endswith("tokens_per_expert"):
        return
    mtp = range(cfg.num_hidden_layers, cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    if name == "model.embed_tokens.weight":
        yield put(name, t)
        for j in mtp:
            yield put(f"model.layers.{j}.embed_tokens.weight", t)
        return
    if name == "lm_head.weight":
        yield put(name, t)  # also when tied: vLLM and SGLang read lm_head.weight whatever the config says
        for j in mtp:
            yield put(f"model.layers.{j}.shared_head.head.weight", t)
        return
    m = _FUSED_RE.match(name)
    if m is None:
        yield put(name, t)
        return
    prefix, kind = m.groups()
    f = t.shape[-1] if kind == "down_proj" else t.shape[1] // 2
    for e in range(t.shape[0]):
        if kind == "down_proj":
            yield put(f"{prefix}.{e}.down_proj.weight", t[e])
        else:
            yield put(f"{prefix}.{e}.gate_proj.weight", t[e, :f])
            yield put(f"{prefix}.{e}.up_proj.weight", t[e, f:])


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF DeepseekV3 names (see `hf_tensors`)."""
    return dict(item for name, t in model.state_dict().items() for item in hf_tensors(model.config, name, t, dtype))


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek FP8 weights: w [N, K] e4m3, scale_inv [ceil(N/128), ceil(K/128)] -> fp32 w * s."""
    n, k = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f and "/" not in f and "\\" not in f
                                                   for f in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names in the folder")
    return weight_map


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.is_file():
        files = sorted({path / f for f in _weight_map(index).values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
        return files
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    # old training checkpoints kept optimizer and RNG state next to the weights
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith(("optimizer", "rng.")))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path} (expected {SINGLE_NAME} or {INDEX_NAME})")
    return files


def _has_layer(path: Path, layer: int) -> bool:
    prefix = f"model.layers.{layer}."
    for f in _checkpoint_files(path):
        with open_safetensors(f) as fh:
            if any(k.startswith(prefix) for k in fh.keys()):
                return True
    return False


def iter_checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint folder, shard by shard."""
    for f in _checkpoint_files(path):
        with open_safetensors(f) as fh:
            for name in fh.keys():
                try:
                    t = fh.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise safetensors_error(f, e) from None
                yield name, t


def _header_shapes(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, meta tensor of the stored shape) for every tensor of a checkpoint folder: its
    headers read and checked, no data."""
    for f in _checkpoint_files(path):
        with open_safetensors(f) as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)  # dtype "F32", "BF16", "F8_E4M3", "I64", ...: only float vs not matters here
                dtype = torch.float32 if sl.get_dtype().startswith(("F", "BF")) else torch.int64
                yield name, torch.empty(sl.get_shape(), dtype=dtype, device="meta")


def verify_weights(path: str | os.PathLike, cfg: ModelConfig) -> None:
    """Check a checkpoint folder's weights without reading them: every file's header is sound and
    covers the file, the index names files that exist, and the names and shapes are the ones
    `cfg` needs. Raises CheckpointError / FileNotFoundError naming the file."""
    path = Path(path)
    if cfg.num_nextn_predict_layers and not _has_layer(path, cfg.num_hidden_layers):
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("tokens_per_expert")}
    load_hf_state_dict(cfg, _header_shapes(path), expected, source=path)


class CheckpointReader:
    """One tensor at a time from a checkpoint folder (sharded or not), by name, without reading
    the rest: `with CheckpointReader(path) as r: w = r.get(name)`. FP8 weights stored with a
    `weight_scale_inv` come back dequantised (fp32)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        for f in _checkpoint_files(self.path):
            with open_safetensors(f) as fh:
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
            self._open[f] = self._stack.enter_context(open_safetensors(f))
        return self._open[f]

    def get(self, name: str) -> torch.Tensor:
        t = self._file(name).get_tensor(name)
        if name + "_scale_inv" in self._where:
            t = dequantize_fp8_blocks(t, self.get(name + "_scale_inv"))
        return t


def load_hf_state_dict(cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
                       expected: dict[str, torch.Size], source: str | os.PathLike | None = None
                       ) -> dict[str, torch.Tensor]:
    """Map HF-named tensors onto leanmoe parameter names, checking every name and shape.

    expected: leanmoe name -> shape. Raises CheckpointError (a ValueError), one line naming
    `source`, listing missing, unexpected and mis-shaped tensors (with both shapes)."""
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
        w = raw[name]
        if w.dim() != 2 or s.dim() != 2 or tuple(s.shape) != (-(-w.shape[0] // 128), -(-w.shape[1] // 128)):
            errors.append(f"{name}_scale_inv has shape {list(s.shape)}, which is not one scale per 128x128 block "
                          f"of the weight's {list(w.shape)}")
            continue
        raw[name] = dequantize_fp8_blocks(w, s)

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
        elif not state[name].is_floating_point():
            errors.append(f"tensor {name} is {str(state[name].dtype).removeprefix('torch.')}, not floating point")
    errors += [f"unexpected tensor {n} (shape {list(raw[n].shape)})" for n in unexpected]
    if errors:
        more = f"; and {len(errors) - 12} more" if len(errors) > 12 else ""
        where = f"{source}: " if source is not None else ""
        raise CheckpointError(f"{where}the weights do not match config.json: " + "; ".join(errors[:12]) + more)
    return state


# ---------------------------------------------------------------------------- public API
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse shard size {size!r}; use bytes or e.g. '5GB', '500MB'")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


class ShardWriter:
    """Writes named tensors into safetensors files of at most `max_shard_size` bytes as they are
    added, so only one shard is ever held in memory. `close()` names the files `{stem}.safetensors`
    (one) or `{stem}-0000i-of-0000N.safetensors`, writes `index_name` (a weight map) when there are
    several and one is asked for, and returns the names written. Every file is written under a
    temporary name first, so an interrupted save leaves no truncated file under a real name."""

    def __init__(self, folder: str | os.PathLike, stem: str = "model", max_shard_size: int | str = "5GB",
                 index_name: str | None = INDEX_NAME):
        self.folder, self.stem, self.index_name = Path(folder), stem, index_name
        self.limit = _parse_size(max_shard_size)
        self._shard: dict[str, torch.Tensor] = {}
        self._size = self.total_size = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.first_dtype: torch.dtype | None = None

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._shard and self._size + nbytes > self.limit:
            self._flush()
        self._shard[name] = t
        self._size += nbytes
        self.total_size += nbytes
        self.first_dtype = self.first_dtype or t.dtype

    def _flush(self) -> None:
        tmp = self.folder / f".{self.stem}-part{len(self._parts):05d}.tmp"
        save_file(self._shard, str(tmp), metadata={"format": "pt"})
        fsync_file(tmp)  # before the rename that publishes it
        self._parts.append((tmp, list(self._shard)))
        self._shard, self._size = {}, 0

    def close(self) -> set[str]:
        if self._shard or not self._parts:
            self._flush()
        n = len(self._parts)
        names = [f"{self.stem}.safetensors"] if n == 1 else [f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
                                                            for i in range(n)]
        for (tmp, _), fname in zip(self._parts, names):
            os.replace(tmp, self.folder / fname)
        written = set(names)
        if n > 1 and self.index_name:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {t: fname for (_, tensors), fname in zip(self._parts, names) for t in tensors}}
            write_text(self.folder / self.index_name, json.dumps(index, indent=2) + "\n")
            written.add(self.index_name)
        return written


def generation_config(cfg: ModelConfig, tokenizer=None) -> dict[str, Any]:
    """`generation_config.json`: bos/eos (and pad) ids, from the tokenizer when there is one, else
    from the config. A tokenizer with leanmoe's chat turn end (<|end|>) lists it as a second eos,
    so servers that follow generation_config.json stop a chat answer there."""
    out: dict[str, Any] = {"_from_model_config": tokenizer is None, "bos_token_id": cfg.bos_token_id,
                           "eos_token_id": cfg.eos_token_id}
    if tokenizer is not None:
        ids = {}
        for key, attr in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
            try:
                ids[key] = getattr(tokenizer, attr)
            except (AttributeError, KeyError):
                pass
        out.update(ids)
        try:
            end = tokenizer.id_of("<|end|>")
        except (AttributeError, KeyError):
            end = None
        if end is not None and out.get("eos_token_id") is not None and end != out["eos_token_id"]:
            out["eos_token_id"] = [out["eos_token_id"], end]
    return {k: v for k, v in out.items() if v is not None}


def write_generation_config(folder: str | os.PathLike, cfg: ModelConfig, tokenizer=None) -> None:
    write_text(Path(folder) / GENERATION_CONFIG, json.dumps(generation_config(cfg, tokenizer), indent=2) + "\n")


def write_hf_folder(path: str | os.PathLike, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
    """Write HF-named tensors (consumed one at a time), config.json and generation_config.json
    into folder `path`; shard files of an earlier save there that this one does not rewrite are
    removed. Each file is fsync'ed before its rename, the folder after."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(path, "model", max_shard_size, INDEX_NAME)
    for name, t in tensors:
        writer.add(name, t)
    written = writer.close()
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(dtype or writer.first_dtype or torch.float32).removeprefix("torch.")
    write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    write_generation_config(path, cfg)
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    fsync_dir(path)
    return path


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` to folder `path` in the HF DeepseekV3 layout; returns the folder.

    Writes config.json, generation_config.json and the weights. Each file is written under a
    temporary name, fsync'ed and renamed into place, so an interrupted save never leaves a
    truncated file under a real name; shard files of an earlier save in the same folder that this
    save does not rewrite are removed afterwards.
    """
    tensors = hf_state_dict(model, dtype)
    return write_hf_folder(path, model.config, ((n, tensors[n]) for n in sorted(tensors, key=_natural_key)),
                           max_shard_size, dtype)


def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def read_latest_pointer(run_dir: str | os.PathLike) -> Path | None:
    """The folder RUN/checkpoints/latest names: a symlink (or a folder) where symlinks work, else a
    plain file holding the step folder's name. None when there is no pointer. The one reader of
    the pointer leanmoe.train.run_checkpoint writes."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if latest.is_symlink() or latest.is_dir():
        return latest.resolve()
    if latest.is_file():
        try:
            name = latest.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{latest}: not a checkpoint pointer (it should name a step folder)") from None
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{latest}: not a checkpoint pointer (it should name a step folder, got {name[:40]!r})")
        return latest.parent / name
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The HF-layout folder behind `path`: the folder itself when it holds a config.json, or the
    latest checkpoint of a training run folder (`path/checkpoints/latest`, a symlink or a file
    naming the step folder)."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    latest = p / "checkpoints" / "latest"
    target = read_latest_pointer(p)
    if target is None:
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
    state = load_hf_state_dict(cfg, iter_checkpoint_tensors(path), expected, source=path)
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
