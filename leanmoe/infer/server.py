"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, and
beside them (leanmoe.infer.routes) /metrics, /openapi.json + /docs, /tokenize, /detokenize,
/tokenizer_info.

    app = create_app(AsyncEngine(LLM("runs/tiny")), model_name="tiny", api_key=None)
    serve("runs/tiny", host="127.0.0.1", port=8000)              # what `leanmoe serve` runs

FastAPI on uvicorn. The engine runs on its own thread (leanmoe.infer.async_engine); handlers only
validate, tokenise and relay outputs, so the event loop never waits on the model, and a large
body is parsed and tokenised on a worker thread, so it never waits on another client's input
either (leanmoe.infer.limits, which also caps what one request may ask for). Streaming answers
are server-sent events ending in `data: [DONE]`. Every failure a client can cause is a 4xx with
OpenAI's error body {"error": {"message", "type", "param", "code"}}; a client that goes away
(mid-stream or while waiting for a full answer) has its request aborted and its cache blocks
freed. With an API key every route but /health needs it.

What evaluation harnesses use is served as vLLM serves it: completions' `logprobs` and `echo`
(prompt logprobs, also with max_tokens 0), chat's `logprobs` / `top_logprobs`, and
`presence_penalty`, `frequency_penalty`, `logit_bias` (leanmoe.infer.sampler).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from leanmoe.infer.async_engine import AsyncEngine, EngineDeadError
from leanmoe.infer.engine import LLM, RequestOutput
from leanmoe.infer.limits import (Offload, ServerLimits, check_choices, check_counts, context_error,
                                  longest_token_bytes, min_tokens, parse_json)
from leanmoe.infer.logprobs import TokenStrings
from leanmoe.infer.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedParameter
from leanmoe.infer.routes import add_routes, load_metrics, request_body
from leanmoe.infer.responses import (SSE_DONE, APIError, ChatResponses, CompletionResponses, Responses, error_body,
                                     sse)
from leanmoe.infer.sampling_params import SamplingParams
from leanmoe.infer.sequence import Sequence

__all__ = ["create_app", "serve", "APIError", "ServerLimits"]

log = logging.getLogger("leanmoe.infer.server")
DISCONNECT_POLL_S = 0.25


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers or None)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    if not loc:
        return str(err.get("msg")), None
    return f"invalid value for '{'.'.join(loc)}': {err.get('msg')}", loc[0]


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a chunked upload has no length
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_api_key(api_key: str | None) -> None:
    if api_key is not None and not api_key.strip():  # an empty bearer token would match it
        raise ValueError("api_key is empty; pass a key, or None to serve without one")


class BearerAuth:
    """ASGI middleware: every route but /health needs `Authorization: Bearer <api_key>` (compared
    in constant time). Plain ASGI rather than BaseHTTPMiddleware, which would hide client
    disconnects from handlers."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(APIError(401, "Incorrect API key provided. Pass it as "
                                                   "'Authorization: Bearer KEY'.", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Handler:
    """The request logic, separate from routing so it reads top to bottom."""

    def __init__(self, engine: AsyncEngine, model_name: str, limits: ServerLimits):
        self.engine = engine
        self.llm: LLM = engine.llm
        self.model_name = model_name
        self.created = int(time.time())
        self.limits = limits
        self.offload = Offload(limits)
        tok = self.llm.tokenizer
        self.longest_token = longest_token_bytes(tok)  # for the length check before tokenising
        self.tokens_per_message = 2 if hasattr(tok, "encode_chat") else 0  # <|role|> ... <|end|>
        self.strings = TokenStrings(tok) if tok is not None else None  # token names for logprobs
        self.metrics = load_metrics(self.llm, model_name, engine.counters)  # None without prometheus_client

    # ------------------------------------------------------------------ building requests
    async def prepare(self, request: Request, model: type, build: Callable[[Any], list[Sequence]]
                      ) -> tuple[Any, list[Sequence]]:
        """Read, validate and tokenise a request: (the request, its sequences). On the loop only
        when the body is small (limits.Offload)."""
        raw = await _read_body(request, self.limits.max_body_bytes)
        size = len(raw)
        req = await self.offload.run(self.decode, raw, model, cost=size)
        del raw
        return req, await self.offload.run(build, req, cost=size * req.n)  # each choice copies its prompt

    def decode(self, raw: bytes, model: type) -> Any:
        data = parse_json(raw, self.limits.max_json_containers)
        check_counts(data, self.limits, self.llm.max_model_len, self.tokens_per_message)
        try:
            req = model.model_validate(data)
            req.check_supported()
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param=param) from None
        except UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param) from None
        return req

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            shown = name if len(name) <= 200 else name[:200] + "..."
            raise APIError(404, f"The model `{shown}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _check_fits(self, chars: int, least_tokens: int, param: str) -> None:
        """Refuse, before tokenising, text that certainly cannot fit the context."""
        least = least_tokens + min_tokens(chars, self.longest_token)
        if least >= self.llm.max_model_len:
            raise context_error(self.llm.max_model_len, f"your prompt has at least {least} tokens ({chars} "
                                "characters)", param)

    def _sequences(self, prompts: list[str | list[int]], req: Any, extra_stop_ids: list[int], prompt_param: str,
                   logprobs: int | None = None, prompt_logprobs: int | None = None) -> list[Sequence]:
        """req.n sequences per prompt (choice index = prompt index * n + j), validated."""
        llm = self.llm
        limit = llm.max_model_len
        check_choices(len(prompts), req.n, self.limits)
        for prompt in prompts:  # all of them, before any is tokenised
            if isinstance(prompt, str):
                self._check_fits(len(prompt), 0, prompt_param)
            elif len(prompt) >= limit:
                raise context_error(limit, f"your prompt has {len(prompt)} tokens", prompt_param)
        seqs = []
        rid = uuid.uuid4().hex
        for i, prompt in enumerate(prompts):
            try:
                ids = llm.encode(prompt)
            except ValueError as e:
                raise APIError(400, str(e), param=prompt_param) from None
            if len(ids) >= limit:
                raise context_error(limit, f"your prompt has {len(ids)} tokens", prompt_param)
            room = limit - len(ids)
            explicit = bool({"max_tokens", "max_completion_tokens"} & req.model_fields_set)
            max_tokens = req.max_tokens if req.max_tokens is not None else room
            if max_tokens > room:
                if explicit:
                    raise context_error(limit, f"you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                                        f"prompt, {max_tokens} for the completion)", "max_tokens")
                max_tokens = room
            for j in range(req.n):
                try:
                    params = SamplingParams(
                        temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p,
                        top_k=max(req.top_k or 0, 0),
                        seed=None if req.seed is None else req.seed + j,
                        max_tokens=max_tokens, stop=req.stop_list(), stop_token_ids=extra_stop_ids,
                        ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty or 0.0,
                        frequency_penalty=req.frequency_penalty or 0.0, logit_bias=req.bias(),
                        logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                except UnsupportedParameter as e:
                    raise APIError(400, str(e), param=e.param) from None
                except ValueError as e:  # SamplingParams names the field first
                    raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None
                try:
                    seqs.append(llm.make_sequence(ids, params, f"{rid}-{i}-{j}", stream=True))
                except ValueError as e:
                    param = "logit_bias" if str(e).startswith("logit_bias") else prompt_param
                    raise APIError(400, str(e), param=param) from None
        return seqs

    def completion_sequences(self, req: CompletionRequest) -> list[Sequence]:
        self._check_model(req.model)
        try:
            prompts = req.prompts()
        except UnsupportedParameter as e:
            raise APIError(400, str(e), param=e.param) from None
        seqs = self._sequences(prompts, req, [], "prompt", logprobs=req.logprobs,
                               prompt_logprobs=req.logprobs if req.echo else None)
        if req.echo:  # here, off the event loop when the request is large
            tok = self.llm.tokenizer
            req._echo_texts = [p if isinstance(p, str) else tok.decode(p) if tok is not None else ""
                               for p in prompts]
        return seqs

    def chat_sequences(self, req: ChatCompletionRequest) -> list[Sequence]:
        self._check_model(req.model)
        tok = self.llm.tokenizer
        if tok is None or not hasattr(tok, "apply_chat_template"):
            raise APIError(400, "this model has no chat template; use /v1/completions")
        messages = req.chat_messages()
        self._check_fits(sum(len(m["content"]) for m in messages), self.tokens_per_message * len(messages) + 1,
                         "messages")
        try:
            if hasattr(tok, "encode_chat"):  # message contents cannot smuggle in control tokens
                prompt: str | list[int] = tok.encode_chat(messages, add_generation_prompt=True)
            else:
                prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return self._sequences([prompt], req, self.llm.chat_stop_token_ids(), "messages",
                               logprobs=(req.top_logprobs or 0) if req.logprobs else None)

    # ------------------------------------------------------------------ running them
    async def outputs(self, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several sequences as they come, tagged with the sequence's index; finished
        ones are recorded in the metrics."""
        async for i, out in self._outputs(seqs):
            if out.finished and self.metrics is not None:
                self.metrics.observe(out)
            yield i, out

    async def _outputs(self, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
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
        if isinstance(req, CompletionRequest):
            wanted, echo = req.logprobs, req._echo_texts
        else:
            wanted, echo = (req.top_logprobs or 0) if req.logprobs else None, None
        bodies = kind(self.model_name, seqs, req.n, self.strings, wanted, echo)
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
        # the body grows with the logprobs asked for: built and rendered off the loop when large
        entries = sum(len(o.token_ids) + len(o.prompt_logprobs or ()) for o in outs) if wanted is not None else 0
        return await self.offload.run(lambda: JSONResponse(bodies.full(outs)), cost=entries * (wanted or 1) * 32)

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


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app. Starts the engine thread on startup and stops it on shutdown.
    api_key None serves without auth; an empty key is a ValueError (it would let anyone in)."""
    _check_api_key(api_key)
    handler = _Handler(engine, model_name, limits or ServerLimits())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            handler.offload.shutdown()

    app = FastAPI(title="leanmoe", lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.handler = handler

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(APIError(400, str(e.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind, headers=e.headers))  # 405: Allow

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal server error: {type(e).__name__}", type="server_error"))

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return error_response(APIError(503, "the inference engine is not running", type="server_error"))
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

    @app.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
    async def completions(request: Request):
        req, seqs = await handler.prepare(request, CompletionRequest, handler.completion_sequences)
        return await handler.respond(request, req, seqs, CompletionResponses)

    @app.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        req, seqs = await handler.prepare(request, ChatCompletionRequest, handler.chat_sequences)
        return await handler.respond(request, req, seqs, ChatResponses)

    add_routes(app, handler, secured=api_key is not None)
    return app



# ---------------------------------------------------------------------------- running it
def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info", limits: ServerLimits | None = None,
          threads: int | None = None, engine_process: bool | None = None, **engine_options: Any) -> None:
    """Load a checkpoint and serve it until interrupted. Binds loopback unless `host` says otherwise.
    threads: torch's CPU threads for the model (None: `serving_threads()`).
    engine_process: run the engine in a process of its own (leanmoe.infer.engine_process) rather
    than on a thread beside the event loop; None: on CPUs, where it measured faster. The server's
    process then holds a second copy of the weights (it tokenises and validates; the KV cache is
    only in the engine's)."""
    import uvicorn

    _check_api_key(api_key)  # before the model loads
    llm = LLM(checkpoint, **engine_options)
    cpu = llm.runner.device.type == "cpu"
    if llm.tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json found for {checkpoint} (looked in the checkpoint folder and "
                                "its run folder)")
    name = model_name or os.path.basename(os.path.normpath(str(checkpoint)))
    own_process = engine_process if engine_process is not None else cpu
    n_threads = serving_threads(threads, own_process=own_process) if cpu else None
    if own_process:
        from leanmoe.infer.engine_process import EngineProcess

        engine: Any = EngineProcess(llm, checkpoint, threads=n_threads)
        compiled = "compiled in the engine process at startup" if llm.config.compile_decode else "eager"
    else:
        if cpu:
            torch.set_num_threads(n_threads)
        engine = AsyncEngine(llm)
        # compile before serving (the cache is still empty), so no request waits for it
        compiled = llm.runner.compile_decode(warmup=True) if llm.config.compile_decode else "eager"
    where = "its own process" if own_process else "a thread beside the event loop"
    setup = f"{llm.runner.device} ({llm.config.dtype})" + (f", {n_threads} threads" if cpu else "")
    if cpu:
        from leanmoe.kernels.cpu_kernels import status

        setup += f"; C kernels (attention, experts): {status()}"
    setup += f"; decode step: {compiled}"
    print(f"leanmoe serve: {name} on {setup}; the engine runs in {where}", file=sys.stderr, flush=True)
    app = create_app(engine, name, api_key, limits)
    freeze_startup_heap()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        gc.unfreeze()  # let shutdown free them (extensions such as Triton's report what it does not)


def serving_threads(requested: int | None = None, cores: int | None = None, own_process: bool = True) -> int:
    """CPU threads for the model while serving: `requested`, else $OMP_NUM_THREADS when set, else
    every core when the engine has a process of its own, all but one when it shares the server's.
    NOTE (2-core benchmark machine, docs/benchmarks.md): sharing the process, the model thread and
    the event loop take turns on the interpreter lock, and 1 model thread served more than 2; in
    its own process the engine left the other core ~80% idle, and 2 threads served 1.15x more at
    concurrency 16 than 1 (a single stream ~5% less, within the noise)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    n = cores if cores is not None else (os.cpu_count() or 1)
    return n if own_process else max(1, n - 1)


def freeze_startup_heap() -> None:
    """Exempt every object alive now (torch, the model, the app: a few hundred thousand) from
    garbage collection until `gc.unfreeze()`. Otherwise a full collection walks them all, ~0.2 s
    with the GIL held, whenever requests have allocated enough containers, and every client waits.
    Process-wide, so `serve` calls it, not `create_app`."""
    gc.collect()
    gc.freeze()
