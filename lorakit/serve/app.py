"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions (with server-sent-event
streaming), models, health, and admin endpoints to load/unload adapters by name at run time.

A request's `model` field picks the adapter (or the base model's name for no adapter). Errors are
OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status of the
lorakit error behind them (`lorakit.errors.http_status`, the one table). The routes live at module
level and find the engine, the base model's name, the API key and the limits in `app.state`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import ConfigError, LorakitError, http_status
from ..generate import Row, Sampling, prompt_ids
from .bodies import AdminBody, APIError, Body, ChatBody, CompletionBody, Limits, message_text, read_body
from .engine import Done, Engine, Event, Failed, Text
from .engine import Request as Job


def create_app(
    engine: Engine, base_name: str, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    """The FastAPI app serving `engine`; `base_name` is the `model` id of the plain base model."""
    app = FastAPI(title="lorakit", lifespan=_lifespan, openapi_url=None)  # no unauthenticated docs
    app.state.engine, app.state.base_name = engine, base_name
    app.state.api_key, app.state.limits = api_key, limits or Limits()
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.include_router(public)
    app.include_router(private)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    app.state.engine.start()
    yield
    app.state.engine.stop()


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return e.response()


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    return APIError(e.status_code, str(e.detail)).response()


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(e).__name__}").response()


async def _check_key(request: Request) -> None:
    key = request.app.state.api_key
    if key:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )


public = APIRouter()
private = APIRouter(dependencies=[Depends(_check_key)])


def _adapter_for(request: Request, model: str) -> str | None:
    if model == request.app.state.base_name:
        return None
    if model not in request.app.state.engine.cache:
        raise APIError(
            404, f"the model {model!r} does not exist; see /v1/models", param="model", code="model_not_found"
        )
    return model


def _make_job(
    request: Request,
    body: Body,
    ids: list[int],
    max_tokens: int | None,
    param: str,
    default: int | None = None,
) -> Job:
    """Check the request against the limits and queue it; 400/404/503 on failure. Without
    `max_tokens` the reply may take `default` tokens (or all there is room for), within the room."""
    engine: Engine = request.app.state.engine
    limits: Limits = request.app.state.limits
    adapter = _adapter_for(request, body.model)
    if body.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
            param=param,
            code="context_length_exceeded",
        )
    room = limits.max_tokens  # what the reply may take: the limit, and what the model has left
    if engine.context_length is not None:
        room = min(room, engine.context_length - len(ids))
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the model takes at most {engine.context_length} "
                "tokens, prompt and reply together",
                param=param,
                code="context_length_exceeded",
            )
    if max_tokens is None:
        max_tokens = min(default or room, room)
    if not 1 <= max_tokens <= room:
        raise APIError(
            400,
            f"max_tokens must be between 1 and {room} for this prompt, got {max_tokens}",
            param="max_tokens",
        )
    try:
        sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed)
    except ConfigError as e:
        raise APIError.of(e) from None
    stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
    job = Job(Row(ids, adapter, sampling), asyncio.get_running_loop(), stop)
    try:
        engine.submit(job)
    except queue.Full:
        raise APIError(503, "the server is busy (request queue full); retry later") from None
    return job


@public.get("/health")
async def health(request: Request):
    engine: Engine = request.app.state.engine
    if not engine.alive:  # requests would wait for nobody: tell load balancers
        return JSONResponse({"status": "stopped"}, status_code=503)
    return {"status": "ok", "queued": engine.queue.qsize(), "loaded_adapters": engine.cache.loaded_names()}


@private.get("/v1/models")
async def models(request: Request) -> dict:
    now, base = int(time.time()), request.app.state.base_name
    data = [{"id": base, "object": "model", "created": now, "owned_by": "lorakit"}]
    data += [
        {"id": n, "object": "model", "created": now, "owned_by": "lorakit", "parent": base}
        for n in request.app.state.engine.cache.names()
    ]
    return {"object": "list", "data": data}


@private.post("/v1/completions")
async def completions(request: Request):
    body = await read_body(request, CompletionBody)
    engine: Engine = request.app.state.engine
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        prompt = prompt[0]
    ids = list(prompt) if isinstance(prompt, list) else prompt_ids(engine.tokenizer, prompt, chat=False)
    if any(not 0 <= t < engine.vocab_size for t in ids):
        raise APIError(400, f"token ids must be in [0, {engine.vocab_size})", param="prompt")
    job = _make_job(request, body, ids, body.max_tokens, "prompt", default=16)  # OpenAI's default

    def chunk(text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    return await _respond(request, job, body, "text_completion", "cmpl", chunk, chunk, len(ids))


@private.post("/v1/chat/completions")
async def chat(request: Request):
    body = await read_body(request, ChatBody)
    messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
    try:
        ids = prompt_ids(request.app.state.engine.tokenizer, messages)
    except ConfigError as e:  # no chat template, or one that rejects the roles
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    # max_completion_tokens supersedes max_tokens (OpenAI); 0 is a value, not "unset"
    wanted = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    job = _make_job(request, body, ids, wanted, "messages")

    def chunk(key: str) -> Callable[[str, str | None], dict]:
        def make(text: str, finish: str | None) -> dict:
            return {
                "index": 0,
                key: {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }

        return make

    return await _respond(
        request, job, body, "chat.completion", "chatcmpl", chunk("delta"), chunk("message"), len(ids)
    )


async def _next_event(request: Request, job: Job, watch: bool = True) -> Event | None:
    """The job's next event; None if the client went away (`watch`; the job is then cancelled).
    A stream does not watch: Starlette ends it when a send to a gone client fails."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.5)
        except TimeoutError:
            if watch and await request.is_disconnected():
                job.cancelled.set()
                return None
            if not request.app.state.engine.alive:
                return Failed(503, "the server's generation worker has stopped; retry later")


async def _respond(
    request: Request, job: Job, body: Body, kind: str, prefix: str, delta, whole, n_prompt: int
):
    """The reply to `job`: one JSON object, or server-sent events when `body.stream`."""
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    # wait for the first event before answering, so an error before any output gets its status
    first = await _next_event(request, job, watch=not body.stream)
    if isinstance(first, Failed):
        raise APIError(first.status, first.message)
    if first is None:
        return JSONResponse({}, status_code=499)
    if body.stream:
        return StreamingResponse(
            _stream(request, job, first, head, kind, delta), media_type="text/event-stream"
        )
    pieces, event = [], first
    while isinstance(event, Text):
        pieces.append(event.piece)
        event = await _next_event(request, job)
    if event is None:
        return JSONResponse({}, status_code=499)
    if isinstance(event, Failed):
        raise APIError(event.status, event.message)
    choice = whole("".join(pieces), event.finish_reason)
    n = event.completion_tokens
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
    return {**head, "object": kind, "choices": [choice], "usage": usage}


async def _stream(
    request: Request, job: Job, event: Event, head: dict, kind: str, chunk
) -> AsyncIterator[str]:
    obj = kind + ".chunk" if kind == "chat.completion" else kind
    try:
        while event is not None:
            if isinstance(event, Text):
                yield _sse({**head, "object": obj, "choices": [chunk(event.piece, None)]})
            elif isinstance(event, Done):
                yield _sse({**head, "object": obj, "choices": [chunk("", event.finish_reason)]})
                yield "data: [DONE]\n\n"
                return
            else:  # the status line is sent already: the error goes in the stream
                yield _sse(APIError(event.status, event.message).body())
                return
            event = await _next_event(request, job, watch=False)
    finally:  # normal end, or the client went away (the response task is cancelled)
        job.cancelled.set()


# admin: adapters by name from --adapter-dir -----------------------------------------------------


@private.get("/admin/adapters")
async def list_adapters(request: Request) -> dict:
    cache = request.app.state.engine.cache
    loaded = set(cache.loaded_names())
    return {"data": [{"id": n, "loaded": n in loaded} for n in cache.names()]}


@private.post("/admin/adapters")
async def load(request: Request) -> dict:
    body = await read_body(request, AdminBody)
    if body.name == request.app.state.base_name:
        raise APIError(
            400, f"{body.name!r} is the base model's id; name the adapter differently", param="name"
        )
    await _admin(request.app.state.engine.add_adapter, body.name)
    return {"id": body.name, "loaded": True}


@private.delete("/admin/adapters/{name}")
async def unload(request: Request, name: str) -> dict:
    await _admin(request.app.state.engine.remove_adapter, name)
    return {"id": name, "deleted": True}


async def _admin(action: Callable[[str], None], name: str) -> None:
    try:
        await asyncio.to_thread(action, name)  # waits for the model lock: between batches
    except LorakitError as e:
        code = "model_not_found" if http_status(e) == 404 else None
        raise APIError.of(e, param="name", code=code) from None


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
