"""`leanmoe <command>`: thin argument parsing over library functions a user could call directly.

    info | train | cost         leanmoe.train.commands
    generate | chat | serve     leanmoe.infer.commands
    eval                        leanmoe.infer.harness (lm-evaluation-harness)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from leanmoe.infer.commands import register as register_infer
    from leanmoe.infer.harness import register as register_eval
    from leanmoe.train.commands import register as register_train

    p = argparse.ArgumentParser(prog="leanmoe", description="Train and serve DeepSeek-V3-style MoE models.")
    sub = p.add_subparsers(dest="command", required=True)
    register_train(sub)  # info, train, cost
    register_infer(sub)  # generate, chat, serve
    register_eval(sub)  # eval (lm-evaluation-harness)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"leanmoe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
