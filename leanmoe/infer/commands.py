"""`leanmoe generate | chat | serve`: argument parsing over library functions.

    leanmoe generate CHECKPOINT "prompt"      stream a completion to the terminal
    leanmoe chat CHECKPOINT                   interactive chat with the tokenizer's chat template
    leanmoe serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-choices 256]

CHECKPOINT is a training run folder (its latest checkpoint and tokenizer) or an HF-layout folder
holding a tokenizer.json. `register(subparsers)` adds the three commands to leanmoe's CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import TextIO

__all__ = ["register", "load_llm", "generate_to", "chat_loop", "api_key_from"]

API_KEY_ENV = "LEANMOE_API_KEY"


def load_llm(args: argparse.Namespace):
    """An LLM from the common arguments; a tokenizer is required."""
    from leanmoe.infer.engine import LLM

    options = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                   num_blocks=args.num_blocks, max_model_len=args.max_model_len, compile=args.compile)
    if args.no_speculative:
        options["speculative"] = False
    llm = LLM(args.checkpoint, **{k: v for k, v in options.items() if v is not None})
    if llm.tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json found for {args.checkpoint} (looked in the checkpoint folder "
                                "and its run folder)")
    return llm


def _params(args: argparse.Namespace, **extra):
    from leanmoe.infer.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_tokens=args.max_tokens, stop=args.stop or [], **extra)


def generate_to(llm, prompt: str | list[int], params, out: TextIO | None = None) -> str:
    """Stream one completion to `out` (default stdout) as it is generated; returns the text."""
    out = out or sys.stdout
    parts = []
    for o in llm.stream(prompt, params):
        if o.delta_text:
            out.write(o.delta_text)
            out.flush()
            parts.append(o.delta_text)
    out.write("\n")
    return "".join(parts)


def chat_loop(llm, params, system: str | None = None, read: Callable[[str], str] = input,
              out: TextIO | None = None) -> list[dict[str, str]]:
    """Read user turns with `read` until EOF (or /exit), stream each answer to `out` (default
    stdout); /reset starts over. Returns the conversation."""
    out = out or sys.stdout
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    stop_ids = llm.chat_stop_token_ids()
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = list(base)
            out.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": line})
        ids = llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
        room = llm.max_model_len - len(ids)
        if room < 1:
            out.write(f"(the conversation is longer than the model's context of {llm.max_model_len} tokens; "
                      "/reset to start over)\n")
            messages.pop()
            continue
        p = dataclasses.replace(params, max_tokens=min(params.max_tokens, room),
                                stop_token_ids=list(params.stop_token_ids) + stop_ids)
        try:
            answer = generate_to(llm, ids, p, out)
        except KeyboardInterrupt:  # stop this answer, keep the chat
            out.write("\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer})


# ---------------------------------------------------------------------------- the commands
def cmd_generate(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    generate_to(llm, args.prompt, _params(args, ignore_eos=args.ignore_eos))
    if args.stats:
        s = llm.stats()
        drafts = f"draft acceptance {s['acceptance_rate']:.2f}" if llm.config.speculative else "no MTP drafts"
        print(f"[{s['generated_tokens']} tokens in {s['steps']} steps; {drafts}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    if sys.stdin.isatty():
        print("leanmoe chat: type a message; /reset clears the conversation, Ctrl-D or /exit quits.",
              file=sys.stderr)
        chat_loop(llm, _params(args), system=args.system)
    else:
        chat_loop(llm, _params(args), system=args.system, read=lambda _: _readline_or_eof())
    return 0


def _readline_or_eof() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def api_key_from(flag: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The key the server requires: --api-key, else $LEANMOE_API_KEY, else None (no auth).
    An empty or blank one, from either, is a ValueError: it would let anyone in (an empty bearer
    token matches it) while looking like a key was set."""
    environ = os.environ if environ is None else environ
    if flag is not None:
        if not flag.strip():
            raise ValueError("--api-key is empty; pass a key, or leave the flag out to serve without one")
        return flag
    key = environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"{API_KEY_ENV} is set but empty; set it to a key, or unset it to serve without one")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"leanmoe serve: error: serving needs the 'serve' extra ({e.name or 'fastapi'} is missing): "
              "pip install 'leanmoe[serve]'", file=sys.stderr)
        return 2
    from leanmoe.infer import server

    api_key = api_key_from(args.api_key)
    limits = server.ServerLimits(**({} if args.max_choices is None else {"max_choices": args.max_choices}))
    options = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                   num_blocks=args.num_blocks, max_model_len=args.max_model_len, compile=args.compile)
    if args.no_speculative:
        options["speculative"] = False
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"leanmoe serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    server.serve(args.checkpoint, host=args.host, port=args.port, api_key=api_key, model_name=args.model_name,
                 limits=limits, threads=args.threads, engine_process={"auto": None, "on": True, "off": False}[args.engine_process],
                 **{k: v for k, v in options.items() if v is not None})
    return 0


def _engine_args(p: argparse.ArgumentParser, compile_default: str) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a training run folder (its latest checkpoint) or an HF-layout folder with a tokenizer.json")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps (default: cuda, else mps, else cpu)")
    g.add_argument("--dtype", default="auto", help="weights and cache: auto | fp32 | bf16 | fp16 (or float32 | bfloat16 | "
                   "float16; auto: bf16 on GPU, fp32 elsewhere)")
    g.add_argument("--max-num-seqs", type=int, help="most sequences batched together (default 64)")
    g.add_argument("--block-size", type=int, help="tokens per cache block (default 64)")
    g.add_argument("--num-blocks", type=int, help="cache blocks (default: enough for max-num-seqs full sequences)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    g.add_argument("--no-speculative", action="store_true", help="do not draft with the MTP module")
    g.add_argument("--compile", choices=["auto", "on", "off"], default=compile_default,
                   help="run decode steps through torch.compile (auto: on for fp32 on a CPU, where decode steps took "
                   "0.7-0.9x the eager ones, unless LEANMOE_COMPILE=0). Compiling takes 15-30 s once per start "
                   "(inductor caches its work on disk), so it pays for a server, not for one answer: "
                   f"default {compile_default} here")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")


def register(subparsers) -> None:
    """Add `generate`, `chat` and `serve` to an argparse subparsers object."""
    gen = subparsers.add_parser("generate", help="complete a prompt, streaming to the terminal")
    _engine_args(gen, compile_default="off")
    gen.add_argument("prompt")
    _sampling_args(gen, max_tokens=256)
    gen.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    gen.add_argument("--stats", action="store_true", help="print token counts and draft acceptance to stderr")
    gen.set_defaults(func=cmd_generate)

    chat = subparsers.add_parser("chat", help="chat interactively (uses the tokenizer's chat template)")
    _engine_args(chat, compile_default="off")
    chat.add_argument("--system", help="a system message")
    _sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=cmd_chat)

    srv = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API over HTTP",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models and /health over HTTP "
                    "(needs: pip install 'leanmoe[serve]').",
        epilog=f"API key: --api-key KEY, or the environment variable {API_KEY_ENV} (the flag wins; the variable "
               "keeps the key out of the process list). With neither, /v1/* needs no key. An empty key, from "
               "either, is an error.")
    _engine_args(srv, compile_default="auto")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", metavar="KEY",
                     help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else no key)")
    srv.add_argument("--model-name", help="the model id clients pass (default: the checkpoint folder's name)")
    srv.add_argument("--threads", type=int, metavar="N", help="CPU threads for the model (default: $OMP_NUM_THREADS, "
                     "else every core with --engine-process on, all but one, for the HTTP event loop, with it off)")
    srv.add_argument("--engine-process", choices=["auto", "on", "off"], default="auto",
                     help="run the model in a process of its own, so the HTTP event loop never holds it up "
                     "(auto: on for CPUs, where it measured faster; off: a thread in the server's process)")
    srv.add_argument("--max-choices", type=int, metavar="N",
                     help="most choices one request may ask for, prompts x n (default 256)")
    srv.set_defaults(func=cmd_serve)
