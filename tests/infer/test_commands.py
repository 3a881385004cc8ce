"""leanmoe/infer/commands.py: the generate / chat / serve commands as argparse subcommands."""

import argparse
import io

import pytest

from leanmoe.infer import LLM, SamplingParams
from leanmoe.infer.commands import chat_loop, register


def parser():
    p = argparse.ArgumentParser(prog="leanmoe")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_generate_streams_to_stdout(checkpoint, capsys):
    args = parser().parse_args(["generate", str(checkpoint), "Once upon a time", "--max-tokens", "8",
                                "--temperature", "0", "--ignore-eos", "--stats"])
    assert args.func(args) == 0
    out, err = capsys.readouterr()
    ref = LLM(checkpoint).generate("Once upon a time", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out == ref.text + "\n"
    assert "8 tokens" in err


def test_chat_loop_keeps_history_and_resets(checkpoint):
    llm = LLM(checkpoint)
    lines = iter(["hello", "", "/reset", "again"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    messages = chat_loop(llm, SamplingParams(temperature=0, max_tokens=6), system="be brief", read=read, out=out)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "again" and "(conversation cleared)" in out.getvalue()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_serve_defaults_to_loopback_and_errors_are_clear(tmp_path):
    args = parser().parse_args(["serve", str(tmp_path)])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    with pytest.raises(FileNotFoundError):
        args = parser().parse_args(["generate", str(tmp_path / "missing"), "hi"])
        args.func(args)
