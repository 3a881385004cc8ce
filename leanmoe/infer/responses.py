"""OpenAI API response bodies: completions and chat completions, whole or as server-sent events,
and errors (`APIError`, whose body is `error_body`).

The two endpoints differ only in names and in how a choice carries its text; one request path in
leanmoe.infer.server drives either through the same four calls: `head` (chunks sent before any
output), `deltas` (chunks for one output), `usage_chunk` and `full` (the non-streaming body).
Plain dicts and strings: nothing here touches the engine or the event loop.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from leanmoe.infer.logprobs import TokenLogprob, TokenStrings, chat_logprobs, completion_logprobs

if TYPE_CHECKING:
    from leanmoe.infer.engine import RequestOutput
    from leanmoe.infer.sequence import Sequence

__all__ = ["Responses", "CompletionResponses", "ChatResponses", "APIError", "error_body", "sse", "SSE_DONE"]

SSE_DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, as an HTTP answer or as the last event of a broken stream."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error answered with OpenAI's body: status, message, type, param, code (and extra headers)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def finish_reason(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return "length" if out.finish_reason == "length" else "stop"


class Responses:
    """Bodies of one request's answer: its id, creation time and model name are shared by all.
    `seqs` are the request's sequences, n per prompt (choice index = prompt index * n + j).
    logprobs: None, or the alternatives per token to report (the outputs then carry logprobs);
    `strings` names the tokens. echo (completions): each prompt's text, returned before its
    completion (with its prompt logprobs when logprobs are asked for)."""

    id_prefix: str
    object: str        # the non-streaming body's "object"
    chunk_object: str  # each streamed chunk's "object"

    def __init__(self, model: str, seqs: list[Sequence], n: int, strings: TokenStrings | None = None,
                 logprobs: int | None = None, echo: list[str] | None = None):
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.n = n
        self.prompt_tokens = sum(len(s.prompt_token_ids) for s in seqs) // n  # n choices share each prompt
        self.strings, self.logprobs, self.echo = strings, logprobs, echo
        self.started: set[int] = set()  # streamed choices that sent their first output
        self.offsets: dict[int, int] = {}  # streamed choice -> characters of token strings sent

    def _body(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self, completion_counts: dict[int, int]) -> dict[str, int]:
        """completion_counts: tokens generated per choice index."""
        completion = sum(completion_counts.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return self._body(self.chunk_object, [choice])

    def usage_chunk(self, completion_counts: dict[int, int]) -> dict[str, Any]:
        """The last chunk of a stream that asked for usage: no choices."""
        body = self._body(self.chunk_object, [])
        body["usage"] = self.usage(completion_counts)
        return body

    def full(self, outs: list[RequestOutput]) -> dict[str, Any]:
        """The non-streaming body from every choice's final output."""
        body = self._body(self.object, [self.final_choice(i, o) for i, o in enumerate(outs)])
        body["usage"] = self.usage({i: len(o.token_ids) for i, o in enumerate(outs)})
        return body

    def head(self, i: int) -> list[dict[str, Any]]:
        """Choices streamed for choice i before any output, each in its own chunk."""
        return []

    def deltas(self, i: int, out: RequestOutput) -> list[dict[str, Any]]:
        """Choices streamed for one output of choice i, each in its own chunk."""
        raise NotImplementedError

    def final_choice(self, i: int, out: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError


class CompletionResponses(Responses):
    """/v1/completions: the text is the choice's `text`; one chunk per output, the last one
    carrying the finish reason. With echo the prompt opens the text (and its logprobs, the
    first one null, open the logprobs); text offsets count from the start of the choice's text."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def _parts(self, i: int, out: RequestOutput, text: str, entries: list[TokenLogprob] | None, first: bool
               ) -> tuple[str, list[TokenLogprob]]:
        """The text and logprob entries of an output, the echoed prompt first where it belongs."""
        entries = list(entries or [])
        if first and self.echo is not None:
            text = self.echo[i // self.n] + text
            entries = list(out.prompt_logprobs or []) + entries
        return text, entries

    def _logprobs(self, entries: list[TokenLogprob], offset: int) -> dict[str, list] | None:
        return None if self.logprobs is None else completion_logprobs(self.strings, entries, offset)

    def deltas(self, i: int, out: RequestOutput) -> list[dict[str, Any]]:
        first = i not in self.started
        text, entries = self._parts(i, out, out.delta_text, out.delta_logprobs, first)
        if not (text or out.finished or (self.logprobs is not None and entries)):
            return []
        self.started.add(i)
        lp = self._logprobs(entries, self.offsets.get(i, 0))
        if lp is not None:
            self.offsets[i] = self.offsets.get(i, 0) + sum(len(t) for t in lp["tokens"])
        return [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(out)}]

    def final_choice(self, i: int, out: RequestOutput) -> dict[str, Any]:
        text, entries = self._parts(i, out, out.text, out.logprobs, True)
        return {"index": i, "text": text, "logprobs": self._logprobs(entries, 0), "finish_reason": finish_reason(out)}


class ChatResponses(Responses):
    """/v1/chat/completions: the text is an assistant message; a stream opens each choice with
    its role and closes it with an empty delta carrying the finish reason. With logprobs each
    chunk carries those of its tokens: {"content": [...]}."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, list] | None:
        return None if self.logprobs is None else chat_logprobs(self.strings, entries or [], self.logprobs)

    def head(self, i: int) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def deltas(self, i: int, out: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        if out.delta_text or (self.logprobs is not None and out.delta_logprobs):
            choices.append({"index": i, "delta": {"content": out.delta_text},
                            "logprobs": self._logprobs(out.delta_logprobs), "finish_reason": None})
        if out.finished:
            choices.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason(out)})
        return choices

    def final_choice(self, i: int, out: RequestOutput) -> dict[str, Any]:
        return {"index": i, "message": {"role": "assistant", "content": out.text},
                "logprobs": self._logprobs(out.logprobs), "finish_reason": finish_reason(out)}
