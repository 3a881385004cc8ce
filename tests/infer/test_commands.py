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
    assert "8 tokens" in err and "draft acceptance" in err  # the checkpoint has an MTP module
    args = parser().parse_args(["generate", str(checkpoint), "hi", "--max-tokens", "2", "--no-speculative", "--stats"])
    assert args.func(args) == 0
    assert "no MTP drafts" in capsys.readouterr().err


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


def test_api_key_comes_from_the_flag_else_the_environment_and_is_never_empty():
    from leanmoe.infer.commands import api_key_from

    assert api_key_from(None, {}) is None
    assert api_key_from(None, {"LEANMOE_API_KEY": "env"}) == "env"
    assert api_key_from("flag", {"LEANMOE_API_KEY": "env"}) == "flag"
    for flag, env in (("", {}), ("  ", {}), ("", {"LEANMOE_API_KEY": "env"}), (None, {"LEANMOE_API_KEY": ""}),
                      (None, {"LEANMOE_API_KEY": " "})):
        with pytest.raises(ValueError, match="empty"):
            api_key_from(flag, env)


def test_serve_refuses_an_empty_key_in_one_line(tmp_path, monkeypatch, capsys):
    from leanmoe import cli
    from leanmoe.infer import server

    monkeypatch.setattr(server, "serve", lambda *a, **k: pytest.fail("served with an empty key"))
    monkeypatch.delenv("LEANMOE_API_KEY", raising=False)
    assert cli.main(["serve", str(tmp_path), "--api-key", ""]) == 2
    monkeypatch.setenv("LEANMOE_API_KEY", "")
    assert cli.main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("leanmoe serve: error: ") for line in err), err
    assert "--api-key" in err[0] and "LEANMOE_API_KEY" in err[1]
    with pytest.raises(ValueError, match="empty"):
        server.create_app(None, "m", api_key="")


def test_serve_passes_the_key_from_the_environment_and_the_choice_cap(tmp_path, monkeypatch, capsys):
    from leanmoe import cli
    from leanmoe.infer import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda checkpoint, **kw: seen.update(kw))
    monkeypatch.setenv("LEANMOE_API_KEY", "from-env")
    assert cli.main(["serve", str(tmp_path), "--max-choices", "8"]) == 0
    assert seen["api_key"] == "from-env" and seen["limits"].max_choices == 8
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", "--help"])
    assert "LEANMOE_API_KEY" in capsys.readouterr().out


def test_serve_passes_the_compile_choice(tmp_path, monkeypatch, capsys):
    from leanmoe import cli
    from leanmoe.infer import server

    seen = {}
    monkeypatch.setattr(server, "serve", lambda checkpoint, **kw: seen.update(kw))
    assert cli.main(["serve", str(tmp_path)]) == 0 and seen["compile"] == "auto"
    assert cli.main(["serve", str(tmp_path), "--compile", "off"]) == 0 and seen["compile"] == "off"
    with pytest.raises(SystemExit):
        parser().parse_args(["serve", str(tmp_path), "--compile", "maybe"])
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
    assert parser().parse_args(["generate", str(tmp_path), "hi"]).compile == "off"  # one answer: not worth it
    assert parser().parse_args(["chat", str(tmp_path)]).compile == "off"


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_serve_extra_says_what_to_install(tmp_path, missing):
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{missing!r}] = None; from leanmoe.cli import main; "
            f"sys.exit(main(['serve', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'leanmoe[serve]'" in lines[0] and missing in lines[0], done.stderr
