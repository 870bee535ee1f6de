"""What a request to the server may hold, and how it is read: the body models (strict types:
`"1"` is not a number, `true` is not 1, a lone surrogate is not text), the per-request `Limits`,
`read_body` (size limit, read timeout, UTF-8 JSON, depth), and `APIError`, the OpenAI-style error
answer. Fields the server does not implement are refused unless neutral, never silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from ..errors import ConfigError, LorakitError, http_status


@dataclass
class Limits:
    """Per-request limits; anything above them is refused with a 4xx. Raises `ConfigError` for a
    limit that is not a positive number."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_body_bytes: int = 1_000_000
    body_timeout: float = 30.0  # a body slower than this (or shorter than its Content-Length): 408

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{name} ({flag}) must be a positive number, got {value!r}")


class APIError(Exception):
    """An error answer: HTTP status, message, and OpenAI's `type`, `param` and `code` fields."""

    def __init__(
        self, status: int, message: str, type_: str | None = None, param=None, code=None, headers=None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")

    @classmethod
    def of(cls, exc: LorakitError, param: str | None = None, code: str | None = None) -> APIError:
        """The answer for lorakit error `exc` (its status from the one table)."""
        return cls(http_status(exc), str(exc), param=param, code=code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        # a 408 answers a body that never fully arrived: the connection cannot be reused
        headers = {"Connection": "close"} if self.status == 408 else self.headers
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _utf8(text: str) -> str:
    try:  # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no tokenizer can encode
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate; send valid Unicode") from None
    return text


Str = Annotated[StrictStr, AfterValidator(_utf8)]


# OpenAI fields this server does not implement, with the values that mean "not used": any other
# value is refused (400) rather than silently ignored
UNSUPPORTED = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
}


def _same(a, b) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b  # True is not 1 here


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: "text" (the default) or "json_object" (JSON mode: the reply is
    kept a valid JSON object, `lorakit.serve.json_mode`); "json_schema" is not implemented."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object"]


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`: `include_usage` adds a last chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class Body(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="allow")  # kept only to check them against UNSUPPORTED

    @model_validator(mode="after")
    def _supported(self) -> Body:
        for key, value in (self.model_extra or {}).items():
            if key in UNSUPPORTED and not any(_same(value, v) for v in UNSUPPORTED[key]):
                raise ValueError(f"{key}={value!r} is not supported by this server; leave it out")
        return self

    model: Str
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt = 1.0
    top_p: StrictFloat | StrictInt = 1.0
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stream: StrictBool = False
    seed: StrictInt | None = None
    stop: Str | Annotated[list[Str], Field(max_length=16)] | None = None
    presence_penalty: StrictFloat | StrictInt | None = None
    frequency_penalty: StrictFloat | StrictInt | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None


class CompletionBody(Body):
    """`POST /v1/completions`: a string, one string in a list, or token ids; `logprobs`: how many
    top tokens to list per generated token (0-20)."""

    prompt: Str | list[Str] | list[StrictInt]
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


class TextPart(BaseModel):
    """An OpenAI content part; only text parts are accepted."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Str


class ChatMessage(BaseModel):
    """One chat message: a role and text (a string or text parts)."""

    model_config = ConfigDict(extra="ignore")
    role: Str
    content: Str | list[TextPart] | None = None


class ChatBody(Body):
    """`POST /v1/chat/completions`: at least one message."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


class AdminBody(BaseModel):
    """`POST /admin/adapters`: the adapter to load by name."""

    name: Str


class LoadLoraBody(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter`: the served name and the folder (inside --adapter-dir)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Str
    lora_path: Str | None = None


class UnloadLoraBody(BaseModel):
    """vLLM's `POST /v1/unload_lora_adapter`."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Str


async def read_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The JSON body as `model`; 413 above the size limit, 408 if it does not arrive in time, 400
    for a body that is not UTF-8 JSON (or nests too deeply) or does not fit `model`."""
    limits: Limits = request.app.state.limits
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
    raw = bytearray()

    async def receive() -> None:
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"request body over {limits.max_body_bytes} bytes")

    try:
        await asyncio.wait_for(receive(), limits.body_timeout)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not UTF-8 (byte {e.start}); send JSON in UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the body's JSON nests too deeply") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems: dict[str, str] = {}
        for x in e.errors():
            problems.setdefault(_where(x["loc"]), x["msg"])  # the first problem of each field
        message = "; ".join(f"{where}: {msg}" for where, msg in list(problems.items())[:3])
        raise APIError(400, message, param=_where(e.errors()[0]["loc"])) from None


def _where(loc: tuple) -> str:
    """`messages.0.content` from a pydantic location, without its union-member tags (`str`, ...)."""
    parts = [str(p) for p in loc if isinstance(p, int) or not _UNION_TAG.fullmatch(p)]
    return ".".join(parts) or "body"


_UNION_TAG = re.compile(r"[a-z]+\[.*\]|[A-Z]\w*|float|int|str|bool|list|dict|none|function-\w+\[.*\]")


def message_text(content: str | list[TextPart] | None) -> str:
    """A chat message's text: the string, or its text parts joined."""
    if isinstance(content, list):  # OpenAI content parts (text only)
        return "".join(p.text for p in content)
    return content or ""
