"""The server's routes beside the OpenAI API, for operators and tools:

    GET  /metrics          Prometheus text format (leanmoe.infer.metrics; vLLM's metric names)
    GET  /openapi.json     FastAPI's OpenAPI document, with the request bodies' JSON schemas
    GET  /docs             Swagger UI over it
    POST /tokenize         vLLM's: {"prompt"} -> {"tokens", "count", "max_model_len"}
    POST /detokenize       vLLM's: {"tokens"} -> {"prompt"}
    GET  /tokenizer_info   vLLM's: special tokens and chat template

The last three are what lm-eval's `local-completions` model uses as its "remote" tokenizer (it
detects them), so lm-eval scores a served model without downloading a tokenizer. All of them are
behind the API key when the server has one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from leanmoe.infer.protocol import DetokenizeRequest, TokenizeRequest, openapi_schemas
from leanmoe.infer.responses import APIError

if TYPE_CHECKING:
    from leanmoe.infer.engine import LLM
    from leanmoe.infer.metrics import EngineMetrics

__all__ = ["add_routes", "load_metrics", "request_body"]

log = logging.getLogger("leanmoe.infer.server")


def load_metrics(llm: LLM, model_name: str, counters: Any = None) -> EngineMetrics | None:
    """The engine's metrics, or None (with a warning) when prometheus_client is not installed.
    counters: see EngineMetrics."""
    try:
        from leanmoe.infer.metrics import EngineMetrics

        return EngineMetrics(llm, model_name, counters)
    except ImportError:
        log.warning("prometheus_client is not installed: /metrics is off (pip install 'leanmoe[serve]')")
        return None


def _tokenizer_info(tok: Any, max_model_len: int) -> dict[str, Any]:
    def name(token_id: int | None) -> str | None:
        return None if token_id is None else tok.decode([token_id])

    info = {"tokenizer_class": type(tok).__name__, "eos_token": name(getattr(tok, "eos_id", None)),
            "bos_token": name(getattr(tok, "bos_id", None)), "pad_token": name(getattr(tok, "pad_id", None)),
            "model_max_length": max_model_len}
    if hasattr(tok, "encode_chat"):  # leanmoe's tokenizer: its template, as transformers renders it
        from leanmoe.data.tokenizer import CHAT_TEMPLATE

        info["chat_template"] = CHAT_TEMPLATE
    return info


def add_routes(app: FastAPI, handler: Any, secured: bool) -> None:
    """Add the routes above to `app` (handler: the server's request handler); `secured`: the
    server needs an API key, which the OpenAPI document then declares."""
    llm = handler.llm

    @app.get("/metrics", response_class=Response)
    async def metrics():
        if handler.metrics is None:
            raise APIError(404, "metrics need prometheus_client: pip install 'leanmoe[serve]'", type="not_found_error")
        body, content_type = handler.metrics.render()
        return Response(body, media_type=content_type)

    def tokenizer() -> Any:
        if llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return llm.tokenizer

    def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        ids = tokenizer().encode(req.prompt)
        return {"count": len(ids), "max_model_len": llm.max_model_len, "tokens": ids}

    def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        vocab = llm.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer().decode(req.tokens)}

    @app.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
    async def tokenize_route(request: Request):
        return (await handler.prepare(request, TokenizeRequest, tokenize))[1]

    @app.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
    async def detokenize_route(request: Request):
        return (await handler.prepare(request, DetokenizeRequest, detokenize))[1]

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return _tokenizer_info(tokenizer(), llm.max_model_len)

    def openapi() -> dict[str, Any]:
        """FastAPI's document plus the request bodies' schemas (the routes read their bodies
        themselves, so FastAPI cannot see them) and, with an API key, bearer authentication."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible API of a leanmoe model")
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(openapi_schemas())
            if secured:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                schema["paths"]["/health"]["get"]["security"] = []  # the one open route
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def request_body(model: type) -> dict[str, Any]:
    """OpenAPI's requestBody for a route that reads its body itself (limits, Offload)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
