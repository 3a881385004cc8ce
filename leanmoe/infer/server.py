"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health.

    app = create_app(AsyncEngine(LLM("runs/tiny")), model_name="tiny", api_key=None)
    serve("runs/tiny", host="127.0.0.1", port=8000)              # what `leanmoe serve` runs

FastAPI on uvicorn. The engine runs on its own thread (leanmoe.infer.async_engine); handlers only
validate, tokenise and relay outputs, so the event loop never waits on the model. Streaming
answers are server-sent events ending in `data: [DONE]`. Every failure a client can cause is a
4xx with OpenAI's error body {"error": {"message", "type", "param", "code"}}; a client that goes
away (mid-stream or while waiting for a full answer) has its request aborted and its cache
blocks freed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanmoe.infer.async_engine import AsyncEngine, EngineDeadError
from leanmoe.infer.engine import LLM, RequestOutput
from leanmoe.infer.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedParameter
from leanmoe.infer.responses import SSE_DONE, ChatResponses, CompletionResponses, Responses, error_body, sse
from leanmoe.infer.sampling_params import SamplingParams
from leanmoe.infer.sequence import Sequence

__all__ = ["create_app", "serve", "APIError"]

log = logging.getLogger("leanmoe.infer.server")
MAX_BODY_BYTES = 8 * 2**20
DISCONNECT_POLL_S = 0.25


class APIError(Exception):
    """An error answered with OpenAI's body: status, message, type, param, code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    if not loc:
        return str(err.get("msg")), None
    return f"invalid value for '{'.'.join(loc)}': {err.get('msg')}", loc[0]


async def _parse(request: Request, model: type) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked upload has no length
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        req = model.model_validate(data)
        req.check_supported()
    except ValidationError as e:
        message, param = _validation_message(e)
        raise APIError(400, message, param=param) from None
    except UnsupportedParameter as e:
        raise APIError(400, str(e), param=e.param) from None
    return req


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>` (compared in constant time).
    Plain ASGI rather than BaseHTTPMiddleware, which would hide client disconnects from handlers."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                                    code="invalid_api_key").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Handler:
    """The request logic, separate from routing so it reads top to bottom."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.llm: LLM = engine.llm
        self.model_name = model_name
        self.created = int(time.time())

    # ------------------------------------------------------------------ building requests
    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _sequences(self, prompts: list[str | list[int]], req: Any, extra_stop_ids: list[int], prompt_param: str
                   ) -> list[Sequence]:
        """req.n sequences per prompt (choice index = prompt index * n + j), validated."""
        llm = self.llm
        limit = llm.max_model_len
        seqs = []
        rid = uuid.uuid4().hex
        for i, prompt in enumerate(prompts):
            try:
                ids = llm.encode(prompt)
            except ValueError as e:
                raise APIError(400, str(e), param=prompt_param) from None
            if len(ids) >= limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                               f"has {len(ids)} tokens.", param=prompt_param, code="context_length_exceeded")
            room = limit - len(ids)
            explicit = bool({"max_tokens", "max_completion_tokens"} & req.model_fields_set)
            max_tokens = req.max_tokens if req.max_tokens is not None else room
            if max_tokens > room:
                if explicit:
                    raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                   f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                                   f"{max_tokens} for the completion).", param="max_tokens",
                                   code="context_length_exceeded")
                max_tokens = room
            for j in range(req.n):
                try:
                    params = SamplingParams(
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p,
                        top_k=max(req.top_k or 0, 0),
                        seed=None if req.seed is None else req.seed + j,
                        max_tokens=max_tokens, stop=req.stop_list(), stop_token_ids=extra_stop_ids,
                        ignore_eos=req.ignore_eos)
                except UnsupportedParameter as e:
                    raise APIError(400, str(e), param=e.param) from None
                except ValueError as e:
                    raise APIError(400, str(e)) from None
                try:
                    seqs.append(llm.make_sequence(ids, params, f"{rid}-{i}-{j}", stream=True))
                except ValueError as e:
                    raise APIError(400, str(e), param=prompt_param) from None
        return seqs

    def completion_sequences(self, req: CompletionRequest) -> list[Sequence]:
        self._check_model(req.model)
        try:
            prompts = req.prompts()
        except UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param) from None
        return self._sequences(prompts, req, [], prompt_param="prompt")

    def chat_sequences(self, req: ChatCompletionRequest) -> list[Sequence]:
        self._check_model(req.model)
        tok = self.llm.tokenizer
        if tok is None or not hasattr(tok, "apply_chat_template"):
            raise APIError(400, "this model has no chat template; use /v1/completions")
        try:
            if hasattr(tok, "encode_chat"):  # message contents cannot smuggle in control tokens
                prompt: str | list[int] = tok.encode_chat(req.chat_messages(), add_generation_prompt=True)
            else:
                prompt = tok.apply_chat_template(req.chat_messages(), add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return self._sequences([prompt], req, self.llm.chat_stop_token_ids(), prompt_param="messages")

    # ------------------------------------------------------------------ running them
    async def outputs(self, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several sequences as they come, tagged with the sequence's index."""
        if len(seqs) == 1:
            async for out in self.engine.generate(seqs[0]):
                yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, seq: Sequence) -> None:
            try:
                async for out in self.engine.generate(seq):
                    merged.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - relayed to the consumer
                merged.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
        try:
            remaining = len(seqs)
            while remaining:
                i, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, request: Request, seqs: list[Sequence]) -> list[RequestOutput] | None:
        """Final outputs, or None if the client disconnected first (its requests are aborted)."""
        finals: dict[int, RequestOutput] = {}

        async def run() -> None:
            async for i, out in self.outputs(seqs):
                if out.finished:
                    finals[i] = out

        task = asyncio.create_task(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    task.result()
                    return [finals[i] for i in range(len(seqs))]
                if await request.is_disconnected():
                    return None
        finally:
            if not task.done():
                task.cancel()

    # ------------------------------------------------------------------ answering
    async def respond(self, request: Request, req: CompletionRequest | ChatCompletionRequest, seqs: list[Sequence],
                      kind: type[Responses]) -> Any:
        """The one path of both endpoints: a stream of events, or the whole body once every
        choice has finished (499 if the client left first)."""
        bodies = kind(self.model_name, seqs, req.n)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self.events(seqs, bodies, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            outs = await self.collect(request, seqs)
        except EngineDeadError as e:
            raise APIError(503, str(e), type="server_error") from None
        except RuntimeError as e:
            raise APIError(500, str(e), type="server_error") from None
        if outs is None:
            return Response(status_code=499)
        return bodies.full(outs)

    async def events(self, seqs: list[Sequence], bodies: Responses, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: each choice's head, its outputs as they come, then usage if asked
        and [DONE]. An engine failure mid-stream (the status is already sent) is an error event."""
        counts: dict[int, int] = {}
        for i in range(len(seqs)):
            for choice in bodies.head(i):
                yield sse(bodies.chunk(choice))
        try:
            async for i, out in self.outputs(seqs):
                counts[i] = len(out.token_ids)
                for choice in bodies.deltas(i, out):
                    yield sse(bodies.chunk(choice))
        except (EngineDeadError, RuntimeError) as e:
            yield sse(error_body(str(e), "server_error"))
        if include_usage:
            yield sse(bodies.usage_chunk(counts))
        yield SSE_DONE


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app. Starts the engine thread on startup and stops it on shutdown."""
    handler = _Handler(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="leanmoe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.handler = handler

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return APIError(400, str(e.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal server error: {type(e).__name__}", type="server_error").response()

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return APIError(503, "the inference engine is not running", type="server_error").response()
        return {"status": "ok"}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": handler.created, "owned_by": "leanmoe",
                "max_model_len": engine.llm.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        handler._check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await _parse(request, CompletionRequest)
        return await handler.respond(request, req, handler.completion_sequences(req), CompletionResponses)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        return await handler.respond(request, req, handler.chat_sequences(req), ChatResponses)

    return app


# ---------------------------------------------------------------------------- running it
def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info", **engine_options: Any) -> None:
    """Load a checkpoint and serve it until interrupted. Binds loopback unless `host` says otherwise."""
    import uvicorn

    llm = LLM(checkpoint, **engine_options)
    if llm.tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json found for {checkpoint} (looked in the checkpoint folder and "
                                "its run folder)")
    name = model_name or os.path.basename(os.path.normpath(str(checkpoint)))
    app = create_app(AsyncEngine(llm), name, api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
