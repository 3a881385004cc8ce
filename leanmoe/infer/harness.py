"""lm-evaluation-harness over leanmoe: `leanmoe eval CHECKPOINT --tasks hellaswag,arc_easy`.

`LeanMoeLM` is an lm-eval model (registered as "leanmoe") over a `leanmoe.LLM`:
    loglikelihood            summed log p(continuation | context) and whether it is greedy, from one
                             full forward pass per (batched) pair (leanmoe.infer.scoring)
    loglikelihood_rolling    a whole text's log-likelihood in disjoint windows of the model's
                             context (lm-eval's rolling-window scheme)
    generate_until           the engine's own generation (continuous batching, paged cache), with
                             the stop strings and token budget the task asks for

Context/continuation pairs are tokenised as lm-eval's Hugging Face model does: trailing spaces of
the context move to the continuation, the pair is encoded whole and split after the context's
tokens, and an empty context becomes the end-of-text token.

Needs `pip install 'leanmoe[eval]'` (lm-eval); tasks download their datasets unless given
locally (`--include-path` with task YAMLs over local files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["LeanMoeLM", "evaluate", "register"]  # noqa: F822 (LeanMoeLM: module __getattr__)


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError as e:
        raise ImportError("leanmoe eval needs lm-eval: pip install 'leanmoe[eval]'") from e
    return LM


def _make_class():
    LM = _lm_eval()
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from leanmoe.infer.sampling_params import SamplingParams
    from leanmoe.infer.scoring import score_continuations

    class LeanMoeLM(LM):
        """lm-eval's model interface over a leanmoe.LLM (see the module docstring)."""

        def __init__(self, llm=None, pretrained: str | None = None, batch_tokens: int = 8192, **engine: Any):
            super().__init__()
            if llm is None:
                from leanmoe.infer.engine import LLM

                if pretrained is None:
                    raise ValueError("LeanMoeLM: give an LLM or pretrained=CHECKPOINT")
                llm = LLM(pretrained, **engine)
            if llm.tokenizer is None:
                raise ValueError("LeanMoeLM: the checkpoint has no tokenizer.json; lm-eval passes text")
            self.llm, self.batch_tokens = llm, int(batch_tokens)
            self.tok = llm.tokenizer

        @property
        def max_length(self) -> int:
            return self.llm.max_model_len

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tok.encode(context + continuation)
            ctx = self.tok.encode(context)
            cont = whole[len(ctx):]
            if not ctx:
                ctx = [self.tok.eos_id]
            return ctx, cont

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [self._pair(*r.args) for r in requests]
            out = [(0.0, True)] * len(pairs)
            scored = [i for i, (_, cont) in enumerate(pairs) if cont]  # an empty continuation has p = 1
            results = score_continuations(self.llm.model, [pairs[i] for i in scored], self.max_length,
                                          self.batch_tokens)
            for i, r in zip(scored, results):
                out[i] = r
            for req, r in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", req.args, r)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                ids = self.tok.encode(req.args[0])
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    ids, prefix_token=self.tok.eos_id, max_seq_len=self.max_length, context_len=1)]
                total = sum(lp for lp, _ in score_continuations(self.llm.model, windows, self.max_length,
                                                                 self.batch_tokens))
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
                out.append(total)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            prompts, params = [], []
            for req in requests:
                context, kwargs = req.args
                kwargs = dict(kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen = int(kwargs.pop("max_gen_toks", 256))
                temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
                ids = self.tok.encode(context) or [self.tok.eos_id]
                budget = self.max_length - max_gen
                prompts.append(ids[-budget:] if budget > 0 else ids[-1:])
                params.append(SamplingParams(temperature=temperature, max_tokens=max_gen, stop=until or None))
            outs = self.llm.generate(prompts, params)
            texts = [o.text for o in outs]
            for req, text in zip(requests, texts):
                self.cache_hook.add_partial("generate_until", req.args, text)
            return texts

    from lm_eval.api.registry import register_model

    return register_model("leanmoe")(LeanMoeLM)


def __getattr__(name: str):
    if name == "LeanMoeLM":  # built on first use: lm-eval is an optional dependency
        cls = _make_class()
        globals()["LeanMoeLM"] = cls
        return cls
    raise AttributeError(name)


def evaluate(checkpoint, tasks: list[str], *, num_fewshot: int | None = None, limit: float | None = None,
             include_path: str | None = None, batch_tokens: int = 8192, llm=None, **engine: Any) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of a checkpoint (or an `llm`) on `tasks`; returns its results dict
    (`results[task][metric]`). `include_path`: a folder of task YAMLs (e.g. over local data)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from leanmoe.infer import harness

    lm = harness.LeanMoeLM(llm=llm, pretrained=None if llm is not None else str(checkpoint),
                           batch_tokens=batch_tokens, **engine)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=False, bootstrap_iters=0)


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        _lm_eval()
    except ImportError as e:
        print(f"leanmoe eval: error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--tasks: give at least one task name, e.g. --tasks hellaswag,arc_easy")
    if args.include_path and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path}: no such folder")
    engine = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    results = evaluate(args.checkpoint, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                       include_path=args.include_path, **engine)
    if results is None:
        return 1
    print(make_table(results))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({k: results[k] for k in ("results", "versions", "n-shot", "configs")
                                   if k in results}, indent=2, default=str))
        print(f"results: {out}")
    return 0


def register(subparsers) -> None:
    """Add `eval` to an argparse subparsers object."""
    ev = subparsers.add_parser("eval", help="score a checkpoint on lm-evaluation-harness tasks", description=(
        "Run lm-evaluation-harness tasks on a checkpoint in-process (pip install 'leanmoe[eval]'). "
        "Example: leanmoe eval runs/mine --tasks hellaswag,arc_easy --limit 200"))
    ev.add_argument("checkpoint", help="a training run folder (its latest checkpoint) or an HF-layout folder")
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ev.add_argument("--num-fewshot", type=int)
    ev.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    ev.add_argument("--include-path", help="a folder of extra task YAMLs (e.g. tasks over local files)")
    ev.add_argument("--output", help="write the results as JSON here")
    ev.add_argument("--device", help="auto | cpu | cuda | mps")
    ev.add_argument("--dtype", help="auto | fp32 | bf16 | fp16")
    ev.set_defaults(func=cmd_eval)


