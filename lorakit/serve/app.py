"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions (with server-sent-event
streaming), models, health, and admin endpoints to load/unload adapters by name at run time.

A request's `model` field picks the adapter (or the base model's name for no adapter). Errors are
OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`, with the matching HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from ..errors import AdapterFileError, AdapterStateError, ConfigError, LorakitError
from ..generate import Row, Sampling, prompt_ids
from .engine import Engine
from .engine import Request as Job


@dataclass
class Limits:
    """Per-request limits; anything above them is refused with a 4xx."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 1024
    max_body_bytes: int = 1_000_000


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def create_app(
    engine: Engine, base_name: str, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    """The FastAPI app serving `engine`; `base_name` is the `model` id of the plain base model."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), "invalid_request_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return APIError(
                    401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
                ).response()
        return await call_next(request)

    async def read_body(request: Request, model: type[BaseModel]) -> BaseModel:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            return model.model_validate(json.loads(raw))
        except json.JSONDecodeError as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{param}: {first['msg']}", param=param) from None

    def adapter_for(model: str) -> str | None:
        if model == base_name:
            return None
        if model not in engine.cache.known:
            raise APIError(
                404,
                f"the model {model!r} does not exist; see /v1/models",
                param="model",
                code="model_not_found",
            )
        return model

    def make_job(body: _Body, ids: list[int], max_tokens: int | None) -> Job:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if len(ids) > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
                param="messages" if isinstance(body, ChatBody) else "prompt",
                code="context_length_exceeded",
            )
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        max_tokens = limits.max_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}", param="max_tokens")
        try:
            sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed)
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
        job = Job(Row(ids, adapter_for(body.model), sampling), asyncio.get_running_loop(), stop)
        try:
            engine.submit(job)
        except queue.Full:
            raise APIError(
                503, "the server is busy (request queue full); retry later", "server_error"
            ) from None
        return job

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": engine.queue.qsize(), "loaded_adapters": list(engine.cache.loaded)}

    @app.get("/v1/models")
    async def models() -> dict:
        now = int(time.time())
        data = [{"id": base_name, "object": "model", "created": now, "owned_by": "lorakit"}]
        data += [
            {"id": n, "object": "model", "created": now, "owned_by": "lorakit", "parent": base_name}
            for n in engine.cache.names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            prompt = prompt[0]
        ids = list(prompt) if isinstance(prompt, list) else prompt_ids(engine.tokenizer, prompt, chat=False)
        if any(not 0 <= t < engine.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
        job = make_job(body, ids, body.max_tokens if body.max_tokens is not None else 16)

        def chunk(text: str, finish: str | None) -> dict:
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        return await respond(request, job, body, "text_completion", "cmpl", chunk, len(ids))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, ChatBody)
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        try:
            ids = prompt_ids(engine.tokenizer, messages)
        except (ConfigError, ValueError) as e:  # no chat template, or one that rejects the roles
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        job = make_job(body, ids, body.max_completion_tokens or body.max_tokens)

        def chunk(text: str, finish: str | None, stream: bool = True) -> dict:
            key = "delta" if stream else "message"
            return {
                "index": 0,
                key: {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }

        return await respond(request, job, body, "chat.completion", "chatcmpl", chunk, len(ids))

    async def respond(request: Request, job: Job, body: _Body, kind: str, prefix: str, chunk, n_prompt: int):
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return StreamingResponse(stream(job, head, kind, chunk), media_type="text/event-stream")
        pieces, finish, n = [], "stop", 0
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return JSONResponse({}, status_code=499)
                continue
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "done":
                finish, n = event[1], event[2]
                break
            else:
                raise APIError(
                    event[1], event[2], "server_error" if event[1] >= 500 else "invalid_request_error"
                )
        choice = (
            chunk("".join(pieces), finish)
            if kind == "text_completion"
            else chunk("".join(pieces), finish, False)
        )
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        return {**head, "object": kind, "choices": [choice], "usage": usage}

    async def stream(job: Job, head: dict, kind: str, chunk) -> AsyncIterator[str]:
        obj = kind + ".chunk" if kind == "chat.completion" else kind
        try:
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield _sse({**head, "object": obj, "choices": [chunk(event[1], None)]})
                elif event[0] == "done":
                    yield _sse({**head, "object": obj, "choices": [chunk("", event[1])]})
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield _sse(
                        {"error": {"message": event[2], "type": "server_error", "param": None, "code": None}}
                    )
                    return
        finally:  # normal end, or the client went away (the response task is cancelled)
            job.cancelled.set()

    # admin: adapters by name from --adapter-dir --------------------------------------------

    @app.get("/admin/adapters")
    async def list_adapters() -> dict:
        loaded = set(engine.cache.loaded)
        return {"data": [{"id": n, "loaded": n in loaded} for n in engine.cache.names()]}

    @app.post("/admin/adapters")
    async def load(request: Request) -> dict:
        body = await read_body(request, _AdminBody)
        await asyncio.to_thread(_admin, engine, "load", body.name)
        return {"id": body.name, "loaded": True}

    @app.delete("/admin/adapters/{name}")
    async def unload(name: str) -> dict:
        await asyncio.to_thread(_admin, engine, "unload", name)
        return {"id": name, "deleted": True}

    return app


class _AdminBody(BaseModel):
    name: str


def _admin(engine: Engine, action: str, name: str) -> None:
    """Register+load or unload+forget adapter `name` under the model lock (between batches)."""
    try:
        with engine.lock:
            if action == "load":
                new = name not in engine.cache.known
                if new:
                    engine.cache.register(name)
                try:
                    engine.cache.ensure([name])
                except LorakitError:
                    if new:  # a broken adapter is not left behind as a known name
                        del engine.cache.known[name]
                    raise
            else:
                engine.cache.unregister(name)
    except AdapterStateError as e:
        raise APIError(404, str(e), param="name", code="model_not_found") from None
    except AdapterFileError as e:
        raise APIError(404 if "no adapter named" in str(e) else 422, str(e), param="name") from None
    except LorakitError as e:
        raise APIError(400, str(e), param="name") from None


def _text(content: str | list[dict] | None) -> str:
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return content or ""


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
