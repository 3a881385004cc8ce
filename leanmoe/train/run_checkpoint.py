"""Training checkpoints: a Hugging Face model folder plus, in a subfolder, what resumes exactly.

    RUN/checkpoints/step-N/                 exactly what an HF DeepseekV3 checkpoint holds, so
        config.json                         transformers, vLLM, SGLang and leanmoe load it unchanged
        generation_config.json              (a loader globbing *.safetensors finds the model only)
        model.safetensors                   (model-0000i-of-0000N.safetensors + index past 5 GB)
        tokenizer.json, tokenizer_config.json
        trainer_state/                      what only a resumed run reads:
            optimizer.safetensors           AdamW moments and step counts, keyed by parameter name
                                            (optimizer-0000i-of-0000N.safetensors past 5 GB)
            rng.safetensors                 torch CPU (and CUDA) generator states
            trainer_state.json              step, tokens, elapsed, loader position, schedule, RNG of
                                            python/numpy, the training config
    RUN/checkpoints/latest -> step-N        (a symlink; a plain file naming the folder where
                                            symlinks are unavailable)

Checkpoints written before trainer_state/ existed (its three kinds of files at the top level)
still resume. Router biases travel in the model weights (`e_score_correction_bias`). A checkpoint
is written into a hidden temporary folder, every file and folder in it fsync'ed, and renamed into
place only when complete (the parent folder fsync'ed after), so a crash or power loss at any
moment leaves either the previous checkpoint set or the new one, never a half-written folder.
Nothing is unpickled: tensors are safetensors, the rest JSON.

A damaged checkpoint (a truncated or corrupt file) raises CheckpointError in one line naming the
file; `latest_intact_checkpoint` is how a resume passes over a damaged newest checkpoint to the
newest intact one, saying so.

A distributed run (a model transformed by leanmoe.parallel.parallelize) saves the same folder:
every rank takes part in gathering full tensors one at a time (leanmoe.parallel.full_state) and
rank 0 streams them into shard files, holding at most one shard. On load every rank reads, one
tensor at a time, what its own slices need, so a run saved with N ranks resumes with any M (the
run folder must be on a filesystem every node sees).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from leanmoe.config import ConfigError, ModelConfig
from leanmoe.files import CheckpointError, fsync_dir, fsync_tree, load_safetensors, open_safetensors, read_json
from leanmoe.weights import (ShardWriter, iter_checkpoint_tensors, load_hf_state_dict, read_latest_pointer,
                             save_pretrained, verify_weights, write_generation_config, write_hf_folder)

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "latest_intact_checkpoint", "list_checkpoints",
           "check_checkpoint", "read_trainer_state", "trainer_state_folder", "rng_state", "restore_rng",
           "CheckpointError", "STATE_DIR"]

_STEP_RE = re.compile(r"^step-(\d+)$")
SHARD_SIZE = "5GB"  # largest model / optimizer file of a checkpoint
STATE_DIR = "trainer_state"  # the subfolder weight loaders do not read
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
_STACKED_EXPERTS_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# what trainer_state.json must hold for a resume (save_checkpoint's callers add the rest)
_STATE_KEYS = ("step", "optimizer", "rng")


def trainer_state_folder(ckpt: str | os.PathLike) -> Path:
    """Where a checkpoint keeps its optimizer, RNG and trainer state: `step-N/trainer_state/`, or
    the checkpoint folder itself for checkpoints written before that subfolder existed."""
    ckpt = Path(ckpt)
    return ckpt if (ckpt / STATE_FILE).is_file() and not (ckpt / STATE_DIR).is_dir() else ckpt / STATE_DIR


def _is_complete(p: Path) -> bool:
    return (p / STATE_DIR / STATE_FILE).is_file() or (p / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run (those holding a trainer_state.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if _is_complete(p)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` points at, else the newest complete one, else None. Says nothing of
    whether its files are intact: see latest_intact_checkpoint."""
    try:
        target = read_latest_pointer(run_dir)
    except CheckpointError:
        target = None  # a damaged pointer: the folders still say which checkpoint is newest
    if target is not None and _is_complete(target):
        return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (either layout); CheckpointError naming the file when it is
    damaged or lacks what a resume needs."""
    path = trainer_state_folder(ckpt) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} holds no {STATE_DIR}/{STATE_FILE}: not a training checkpoint")
    state = read_json(path)
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: lacks {', '.join(missing)}; the file is damaged")
    if not isinstance(state["step"], int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise CheckpointError(f"{path}: 'step' must be a non-negative integer, got {state['step']!r}")
    return state


def check_checkpoint(ckpt: str | os.PathLike) -> None:
    """Check a training checkpoint without loading it: trainer_state.json, config.json, the weight
    files' headers against the config's names and shapes, the optimizer and RNG files' headers, and
    that tokenizer.json parses. Raises CheckpointError / ConfigError (ValueErrors) or
    FileNotFoundError, each naming the file."""
    ckpt = Path(ckpt)
    read_trainer_state(ckpt)
    verify_weights(ckpt, ModelConfig.from_pretrained(ckpt))
    for f in _optimizer_files(ckpt) + [trainer_state_folder(ckpt) / RNG_FILE]:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing")
        with open_safetensors(f):
            pass
    if (ckpt / "tokenizer.json").is_file():
        read_json(ckpt / "tokenizer.json")


def latest_intact_checkpoint(run_dir: str | os.PathLike, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint a resume should load: the newest one (`latest`, else by step) whose files
    pass check_checkpoint. Each damaged one passed over is said (one line, naming the file and what
    is wrong). None when the run has no checkpoint; CheckpointError when none is intact.

    Reads only. The damaged folders stay until the resumed run saves its next checkpoint, which
    removes checkpoints of later steps (they belong to the timeline the resume abandoned)."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [newest] + [p for p in reversed(list_checkpoints(run_dir)) if p.resolve() != newest.resolve()]
    problems = []
    for ckpt in candidates:
        try:
            check_checkpoint(ckpt)
        except (CheckpointError, ConfigError, FileNotFoundError) as e:
            problems.append(f"{ckpt.name}: {e}")
            say(f"checkpoint {ckpt.name} is damaged ({e}); trying an earlier one")
            continue
        if problems:
            say(f"resuming from {ckpt.name}, the newest intact checkpoint")
        return ckpt
    raise CheckpointError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: " + "; ".join(problems))


# ---------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, tensors for torch CPU/CUDA generators)."""
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {**np_state["state"], "key": np_state["state"]["key"].tolist()}
    json_state = {"python": [py[0], list(py[1]), py[2]], "numpy": np_state}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return json_state, tensors


def restore_rng(json_state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = json_state["python"]
    random.setstate((v, tuple(state), gauss))
    np_state = json_state["numpy"]
    np_state = {**np_state, "state": {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(np_state)
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------- optimizer
def _optimizer_meta(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's hyperparameters per group, its parameters named."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                             | {"params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]}


def _optimizer_items(model: torch.nn.Module, optimizer: torch.optim.Optimizer, gather=None):
    """AdamW state as (`{parameter name}.{state key}`, CPU tensor), one at a time. gather(name,
    tensor, param) -> full tensor, or None off rank 0: how a distributed model collects its shards
    (a collective; every rank walks the same order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                if gather is not None:
                    t = gather(names[id(p)], t, p)
                    if t is None:
                        continue
                yield f"{names[id(p)]}.{key}", t.detach().to("cpu").contiguous().reshape(t.shape)


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict,
                    ckpt: Path | None = None) -> None:
    """Rebuild torch's own optimizer state_dict (params by index) and let it restore devices."""
    where = f"{trainer_state_folder(ckpt)}: " if ckpt is not None else ""
    names = {id(p): n for n, p in model.named_parameters()}
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    try:
        saved = [g["params"] for g in meta["param_groups"]]
    except (KeyError, TypeError):
        raise CheckpointError(f"{where}trainer_state.json's optimizer metadata is damaged") from None
    if saved != current:
        raise CheckpointError(f"{where}the optimizer state does not match the model's parameters; was the model "
                              "changed?")
    index = {name: i for i, name in enumerate(n for group in current for n in group)}
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        pname, _, sname = key.rpartition(".")
        if pname not in index:
            raise CheckpointError(f"{where}optimizer state for {pname or key!r}, which the model does not have")
        per_param.setdefault(index[pname], {})[sname] = t
    groups = [{**{k: tuple(v) if k == "betas" else v for k, v in g.items() if k != "params"},
               "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


# ---------------------------------------------------------------------------- save / load
def _write_json(path: Path, obj: Any) -> None:
    """Into a checkpoint's temporary folder (fsync'ed with the folder before it is published)."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _point_latest(root: Path, name: str) -> None:
    latest = root / "latest"
    tmp = root / f".latest.tmp-{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
    except OSError:
        tmp.write_text(name + "\n")  # no symlinks here: a file naming the folder
    if latest.is_dir() and not latest.is_symlink():
        shutil.rmtree(latest)
    os.replace(tmp, latest)
    fsync_dir(root)


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, optimizer, state: dict[str, Any],
                    tokenizer=None, keep_last: int = 3) -> Path:
    """Write RUN/checkpoints/step-N atomically, point `latest` at it, keep the last `keep_last`.
    For a parallelized model, call it on every rank (rank 0 writes)."""
    from leanmoe.parallel.full_state import is_parallel

    if is_parallel(model):
        return _save_parallel(run_dir, step, model, optimizer, state, tokenizer, keep_last)

    def write_optimizer(folder: Path) -> dict:
        _write_optimizer_files(folder, _optimizer_items(model, optimizer))
        return _optimizer_meta(model, optimizer)

    return _write_checkpoint(run_dir, step, model.config, lambda folder: save_pretrained(model, folder, SHARD_SIZE),
                             write_optimizer, state, tokenizer, keep_last)


def _write_optimizer_files(folder: Path, items) -> None:
    """optimizer.safetensors, or optimizer-0000i-of-0000N.safetensors past 5 GB (loaders read all)."""
    writer = ShardWriter(folder, "optimizer", SHARD_SIZE, index_name=None)
    for key, t in items:
        writer.add(key, t)
    writer.close()


def _optimizer_files(ckpt: Path) -> list[Path]:
    folder = trainer_state_folder(ckpt)
    files = sorted(folder.glob("optimizer*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no optimizer state (optimizer*.safetensors)")
    return files


def _save_parallel(run_dir, step, model, optimizer, state, tokenizer, keep_last) -> Path:
    """Gather one full tensor at a time on rank 0 (collectives every rank joins in the same
    order) and stream it into the checkpoint's shard files there: rank 0 holds at most one shard
    and one tensor. Then tell every rank how it went."""
    import torch.distributed as dist

    from leanmoe.weights import hf_tensors
    from leanmoe.parallel.full_state import expert_parallel_params, gather_full, reshard

    reshard(model)
    cfg = model.config
    ep = expert_parallel_params(model)
    rank0 = dist.get_rank() == 0
    def weights():  # (HF name, tensor) on rank 0; the collectives run on every rank
        for name, t in model.state_dict().items():
            full = gather_full(t, ep.get(name))
            if full is not None:
                yield from hf_tensors(cfg, name, full)

    def gather(name: str, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor | None:
        return gather_full(t, ep.get(name), like_param=t.shape == p.shape)

    weight_items, moment_items = weights(), _optimizer_items(model, optimizer, gather)

    def write_optimizer(folder: Path) -> dict:
        _write_optimizer_files(folder, moment_items)
        return _optimizer_meta(model, optimizer)

    path, error = Path(run_dir) / "checkpoints" / f"step-{step}", None
    if rank0:
        try:
            path = _write_checkpoint(run_dir, step, cfg,
                                     lambda folder: write_hf_folder(folder, cfg, weight_items, SHARD_SIZE),
                                     write_optimizer, state, tokenizer, keep_last)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            error = e
    for _ in weight_items:  # the other ranks' share of the gathers (and rank 0's, if it failed early)
        pass
    for _ in moment_items:
        pass
    ok = torch.tensor([0 if error else 1], dtype=torch.int64)
    dist.broadcast(ok, 0)
    if error is not None:
        raise error
    if not ok.item():
        raise OSError(f"rank 0 failed to write checkpoint step-{step} (see its error); the last good one is kept")
    return path


def _write_checkpoint(run_dir, step: int, cfg: ModelConfig, write_weights, write_optimizer, state: dict[str, Any],
                      tokenizer, keep_last: int) -> Path:
    """write_weights(folder) writes the HF-layout model files; write_optimizer(folder) the
    optimizer files into trainer_state/, returning their metadata. Both write into a temporary
    folder that is fsync'ed (every file, then the folders) and renamed into place only when
    everything is written; the parent folder is fsync'ed after the rename. Checkpoints of later
    steps (left by a run that resumed from an earlier one) are removed."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp-{os.getpid()}"
    for stale in root.glob(".step-*.tmp-*"):  # left by a process killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        write_weights(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
            write_generation_config(tmp, cfg, tokenizer)
        state_dir = tmp / STATE_DIR
        state_dir.mkdir()
        opt_meta = write_optimizer(state_dir)
        rng_json, rng_tensors = rng_state()
        save_file(rng_tensors, str(state_dir / RNG_FILE))
        _write_json(state_dir / STATE_FILE, {**state, "step": step, "optimizer": opt_meta, "rng": rng_json})
        fsync_tree(tmp)  # every file and folder on the disk before the rename publishes them
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. after a resume): swap atomically, then drop the old
        old = root / f".step-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
        fsync_dir(root)
    _point_latest(root, final.name)
    done = list_checkpoints(run_dir)
    later = [p for p in done if int(p.name.split("-")[1]) > step]  # an abandoned timeline (see docstring)
    earlier = [p for p in done if int(p.name.split("-")[1]) < step]
    for stale in later + (earlier[:max(0, len(earlier) - keep_last + 1)] if keep_last > 0 else []):
        shutil.rmtree(stale)
    return final



def load_checkpoint(ckpt: str | os.PathLike, model, optimizer=None) -> dict[str, Any]:
    """Restore model weights (in place), optimizer moments and RNG from a checkpoint folder;
    returns the trainer state dict (step, tokens, loader position, ...)."""
    from leanmoe.parallel.full_state import is_parallel

    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    if is_parallel(model):
        return _load_parallel(ckpt, state, model, optimizer)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("tokens_per_expert")}
    weights = load_hf_state_dict(model.config, iter_checkpoint_tensors(ckpt), expected, source=ckpt)
    model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        tensors = {k: t for f in _optimizer_files(ckpt) for k, t in load_safetensors(f).items()}
        _load_optimizer(model, optimizer, tensors, state["optimizer"], ckpt)
    _restore_rng_from(ckpt, state)
    return state


def _restore_rng_from(ckpt: Path, state: dict[str, Any]) -> None:
    path = trainer_state_folder(ckpt) / RNG_FILE
    try:
        restore_rng(state["rng"], load_safetensors(path))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the RNG state does not restore ({type(e).__name__}: {e})") from None


def _load_parallel(ckpt: Path, state: dict[str, Any], model, optimizer) -> dict[str, Any]:
    """Every rank reads, one tensor at a time, what its own shards need (its experts' rows, and
    each other tensor whole before keeping its slice) and nothing else; no communication. Host
    memory holds at most one full tensor per rank beyond the shards."""
    from leanmoe.weights import CheckpointReader
    from leanmoe.parallel.full_state import expert_parallel_params, local_shard, reshard

    reshard(model)
    cfg = model.config
    ep = expert_parallel_params(model)
    params = dict(model.named_parameters())

    def put(name: str, dst: torch.Tensor, full: torch.Tensor) -> None:
        if tuple(full.shape) != tuple(dst.shape):  # a DTensor reports its global shape
            raise ValueError(f"checkpoint {ckpt}: {name} has shape {list(full.shape)}, the model expects "
                             f"{list(dst.shape)}")
        piece = local_shard(full, dst, dtype=dst.dtype)
        local = dst.to_local() if hasattr(dst, "to_local") else dst
        local.copy_(piece.to_local() if hasattr(piece, "to_local") else piece)

    with torch.no_grad(), CheckpointReader(ckpt) as reader:
        for name, dst in model.state_dict().items():
            if name.endswith("tokens_per_expert"):
                continue
            try:
                if m := _STACKED_EXPERTS_RE.match(name):
                    prefix, kind = m.groups()
                    disp = ep.get(name)
                    first, n = (disp.first_expert, disp.num_local_experts) if disp else (0, cfg.n_routed_experts)
                    if kind == "gate_up_proj":
                        full = torch.stack([torch.cat([reader.get(f"{prefix}.{e}.gate_proj.weight"),
                                                       reader.get(f"{prefix}.{e}.up_proj.weight")])
                                            for e in range(first, first + n)])
                    else:
                        full = torch.stack([reader.get(f"{prefix}.{e}.down_proj.weight") for e in range(first, first + n)])
                elif name == "lm_head.weight" and cfg.tie_word_embeddings:
                    full = reader.get("model.embed_tokens.weight")
                else:
                    full = reader.get(name)
            except KeyError as e:
                raise CheckpointError(f"cannot resume from {ckpt}: {e.args[0]}") from None
            put(name, dst, full)
    if optimizer is not None:
        tensors = {}
        for f in _optimizer_files(ckpt):
            with open_safetensors(f) as fh:
                for key in fh.keys():
                    pname = key.rsplit(".", 1)[0]
                    disp = ep.get(pname)
                    if disp is not None and len(fh.get_slice(key).get_shape()) > 0:  # this rank's experts only
                        t = fh.get_slice(key)[disp.first_expert:disp.first_expert + disp.num_local_experts]
                    else:
                        t = fh.get_tensor(key)
                    tensors[key] = local_shard(t, params[pname], dtype=t.dtype)
        _load_optimizer(model, optimizer, tensors, state["optimizer"], ckpt)
    _restore_rng_from(ckpt, state)
    return state
