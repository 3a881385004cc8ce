"""What one HTTP request may ask of the server, and where its work runs.

The event loop answers every client, so nothing on it may take time that grows with one
client's input. The server reads a body's bytes there; everything after (JSON, validation, the
chat template, tokenising) runs inline only when the body is small, and on a worker thread
(`Offload`) otherwise. Work that would still be large is refused first, by checks that cost O(1)
or O(number of prompts):

- more than `max_choices` choices (len(prompts) * n) in one request;
- a prompt list longer than that, or a token-id prompt longer than the context, before pydantic
  validates it element by element;
- a prompt that certainly cannot fit the context. A byte-level BPE token stands for at most
  `longest_token_bytes` UTF-8 bytes and a character is at least one byte, so a text of c
  characters has at least ceil(c / longest) tokens: known from len(text), without encoding it.

A worker thread still holds the GIL while C code runs, and the C JSON parser (with the garbage
collections its allocations set off) takes seconds over a body of a million small arrays. So only
a body with few `[`, `{` and `,` bytes (hence few values) goes to the C parser; any other is read
by json's pure-Python scanner, which yields the GIL between values and stops after
`max_json_containers` arrays and objects.

Bodies also have to be text a tokenizer and a response can carry: a lone UTF-16 surrogate
("\\ud800" in JSON) parses to a Python str that UTF-8 cannot encode, and JSON nested deeper than
the parser's recursion limit raises RecursionError. Both are 400s here.
"""

from __future__ import annotations

import asyncio
import json
import json.decoder
import json.scanner
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from leanmoe.infer.responses import APIError

__all__ = ["ServerLimits", "Offload", "parse_json", "check_counts", "check_choices", "longest_token_bytes",
           "min_tokens", "context_error"]

T = TypeVar("T")

# a \u escape of a UTF-16 surrogate: only bodies holding one can parse to a str with a lone one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
C_PARSE_MAX_VALUES = 2**15  # the C parser takes a few milliseconds over this many values


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server.

    max_body_bytes: largest request body (413 above).
    max_choices: most choices in one request, len(prompts) * n (400 above). All of them are queued
        at once, so this bounds how much work one client puts ahead of the others.
    max_json_containers: most JSON arrays and objects in one body (400 above); a request has about
        one per message or prompt.
    inline_bytes: a body up to this size is parsed, validated and tokenised on the event loop (it
        takes microseconds); a larger one on a worker thread, so no client waits on another's input.
    workers: threads for that work; more large bodies than this wait their turn.
    """

    max_body_bytes: int = 8 * 2**20
    max_choices: int = 256
    max_json_containers: int = 2**15
    inline_bytes: int = 16 * 2**10
    workers: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            least = 0 if f.name == "inline_bytes" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"ServerLimits: {f.name} must be an integer >= {least}, got {v!r}")


class Offload:
    """Runs request preparation inline when it is cheap, else on a small thread pool."""

    def __init__(self, limits: ServerLimits):
        self.inline_bytes = limits.inline_bytes
        self.pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="leanmoe-prepare")

    async def run(self, fn: Callable[..., T], *args: Any, cost: int) -> T:
        """fn(*args); `cost` is the input size the work grows with, in bytes (or bytes x choices)."""
        if cost <= self.inline_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- the body
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class _CountingDecoder(json.JSONDecoder):
    """json's pure-Python scanner (strings still go through the C `scanstring`), refusing more
    than `most` arrays and objects."""

    def __init__(self, most: int):
        super().__init__(parse_constant=_no_constant)
        self.left = most

        def counted(parse: Callable[..., Any]) -> Callable[..., Any]:
            def parse_counted(*args: Any) -> Any:
                self.left -= 1
                if self.left < 0:
                    raise APIError(400, f"the body holds more than {most} JSON arrays and objects")
                return parse(*args)
            return parse_counted

        self.parse_object = counted(json.decoder.JSONObject)
        self.parse_array = counted(json.decoder.JSONArray)
        self.scan_once = json.scanner.py_make_scanner(self)


def parse_json(raw: bytes, max_containers: int) -> dict[str, Any]:
    """The body as a JSON object holding only encodable text; APIError 400 naming the problem."""
    try:
        text = raw.decode("utf-8-sig")
        openers = raw.count(b"[") + raw.count(b"{")  # bytes inside strings too: an upper bound
        if openers <= max_containers and openers + raw.count(b",") <= C_PARSE_MAX_VALUES:
            data = json.loads(text, parse_constant=_no_constant)
        else:
            data = _CountingDecoder(max_containers).decode(text)
    except RecursionError:
        raise APIError(400, "the body nests JSON arrays or objects too deeply") from None
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not UTF-8 text: {e}") from None
    except ValueError as e:  # JSONDecodeError, NaN, a 5,000-digit integer
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):
        for key, value in data.items():
            if _has_surrogate(key) or _has_surrogate(value):
                name = None if _has_surrogate(key) else key
                where = f"invalid value for '{name}'" if name else "invalid field name"
                raise APIError(400, f"{where}: a JSON string holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                               "which is not Unicode text", param=name)
    return data


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:  # iterative: parsed JSON can nest as deep as the parser allowed
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def check_counts(data: dict[str, Any], limits: ServerLimits, max_model_len: int, tokens_per_message: int) -> None:
    """Bounds on list lengths, before validation walks the lists. tokens_per_message: the fewest
    tokens the chat template adds per message (0 if unknown)."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int) and len(prompt) >= max_model_len:
            raise context_error(max_model_len, f"your prompt has {len(prompt)} tokens", "prompt")
        if not isinstance(prompt[0], int) and len(prompt) > limits.max_choices:
            raise _choices_error(len(prompt), 1, limits, "prompt")
    messages = data.get("messages")
    if tokens_per_message and isinstance(messages, list) and tokens_per_message * len(messages) >= max_model_len:
        raise context_error(max_model_len, f"your {len(messages)} messages take at least "
                            f"{tokens_per_message * len(messages)} tokens", "messages")


def check_choices(num_prompts: int, n: int, limits: ServerLimits) -> None:
    if num_prompts * n > limits.max_choices:
        raise _choices_error(num_prompts, n, limits, "n" if n > 1 else "prompt")


def _choices_error(num_prompts: int, n: int, limits: ServerLimits, param: str) -> APIError:
    return APIError(400, f"this request asks for {num_prompts * n} choices ({num_prompts} prompts x n={n}); this "
                    f"server allows at most {limits.max_choices} per request", param=param)


# ---------------------------------------------------------------------------- prompt length
def longest_token_bytes(tokenizer: Any) -> int | None:
    """Most UTF-8 bytes one token of `tokenizer` covers, special-token strings included; None for
    a tokenizer that does not say (a leanmoe Tokenizer does: `token_bytes`)."""
    token_bytes = getattr(tokenizer, "token_bytes", None)
    backend = getattr(tokenizer, "backend", None)
    if token_bytes is None or backend is None:
        return None
    added = backend.get_added_tokens_decoder().values()  # matched in text: "<|user|>" is one token
    return max([int(token_bytes().max()), *(len(t.content.encode("utf-8")) for t in added)])


def min_tokens(chars: int, longest: int | None) -> int:
    """The fewest tokens a text of `chars` characters encodes to (0 when `longest` is unknown)."""
    return 0 if not longest else math.ceil(chars / longest)


def context_error(limit: int, what: str, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, {what}.", param=param,
                    code="context_length_exceeded")
