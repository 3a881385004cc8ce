"""OpenAI API request bodies (the subset leanmoe serves), validated strictly.

Types are strict (a string where a number belongs is an error, as with OpenAI), unknown fields
are ignored (clients send vendor extras), and parameters leanmoe does not implement are refused
with a clear message rather than silently ignored. `openapi_schemas` gives these models' JSON
schemas to the server's /openapi.json, so the documentation is what the server accepts.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from leanmoe.infer.logprobs import MAX_LOGPROBS

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "UnsupportedParameter",
           "TokenizeRequest", "DetokenizeRequest", "openapi_schemas"]

MAX_N = 16
MAX_LOGIT_BIAS = 300  # entries: each costs the engine work at every step of the request


class UnsupportedParameter(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM extension; -1 or 0 = off
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1 - MAX_N)  # request j of n draws with seed + j
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string) -> bias in [-100, 100], added to its logits")
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise UnsupportedParameter("stop", "at most 4 stop sequences are allowed")
        if any(not s for s in stop):
            raise UnsupportedParameter("stop", "stop sequences must be non-empty")
        return stop

    def bias(self) -> dict[int, float]:
        """logit_bias with integer token ids (the vocabulary bound is the engine's check)."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 12:
                raise UnsupportedParameter("logit_bias", f"logit_bias keys must be token ids, got {key[:20]!r}")
            if not -100.0 <= value <= 100.0:
                raise UnsupportedParameter("logit_bias", f"logit_bias values must be in [-100, 100], got {value!r}")
            out[int(key)] = value
        return out

    def check_supported(self) -> None:
        if self.logit_bias and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise UnsupportedParameter("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameter("stream_options", "stream_options is only allowed with stream: true")


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0, description="0 with echo: only score the prompt")
    echo: bool = Field(default=False, description="return the prompt before the completion (and its logprobs)")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="log-probabilities of each token with this many alternatives")
    best_of: int | None = None
    suffix: str | None = None
    _echo_texts: list[str] | None = PrivateAttr(default=None)  # each prompt's text, when echoed

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise UnsupportedParameter("prompt", "prompt must not be an empty list")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise UnsupportedParameter("best_of", "best_of other than 1 is not supported by this server")
        if self.suffix:
            raise UnsupportedParameter("suffix", "suffix is not supported by this server")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def chat_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedParameter("top_logprobs", "top_logprobs needs logprobs: true")


class TokenizeRequest(_Strict):
    """vLLM's /tokenize (what lm-eval's remote tokenizer calls). Nothing is added to the text
    (leanmoe's tokenizer adds no bos/eos), whatever add_special_tokens says."""

    n: ClassVar[int] = 1
    model: str | None = None
    prompt: str
    add_special_tokens: bool = False

    def check_supported(self) -> None:
        pass


class DetokenizeRequest(_Strict):
    """vLLM's /detokenize."""

    n: ClassVar[int] = 1
    model: str | None = None
    tokens: list[int]

    def check_supported(self) -> None:
        pass


def openapi_schemas() -> dict[str, Any]:
    """JSON schemas of the request bodies, for an OpenAPI document's components/schemas: each
    model under its class name, nested models as siblings (referenced as #/components/schemas/X)."""
    out: dict[str, Any] = {}
    for model in (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
