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
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from ..errors import ConfigError, LorakitError, http_status
from ..generate import Row, Sampling, prompt_ids
from .bodies import (
    AdminBody,
    APIError,
    Body,
    ChatBody,
    CompletionBody,
    Limits,
    LoadLoraBody,
    UnloadLoraBody,
    message_text,
    read_body,
)
from .cache import NoRoom
from .engine import Engine, TokenLogprob
from .engine import Request as Job
from .replies import chat_logprobs, completion_logprobs, respond
from .waiting import Overloaded


def create_app(
    engine: Engine,
    base_name: str,
    api_key: str | None = None,
    limits: Limits | None = None,
    shutdown_timeout: float = 30.0,
    retry_after: int = 1,
) -> FastAPI:
    """The FastAPI app serving `engine`; `base_name` is the `model` id of the plain base model.
    On shutdown, requests in flight get `shutdown_timeout` seconds to finish (then a 503); a
    busy server's 429/503 answers say `Retry-After: retry_after`."""
    app = FastAPI(title="lorakit", lifespan=_lifespan, openapi_url=None)  # no unauthenticated docs
    app.state.engine, app.state.base_name = engine, base_name
    app.state.shutdown_timeout, app.state.retry_after = shutdown_timeout, retry_after
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
    await asyncio.to_thread(app.state.engine.stop, app.state.shutdown_timeout)


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


def _make_jobs(
    request: Request,
    body: Body,
    ids: list[int],
    max_tokens: int | None,
    param: str,
    default: int | None = None,
    logprobs: int | None = None,
) -> list[Job]:
    """Check the request against the limits and queue its `n` jobs; 400/404, or 429/503 with a
    Retry-After when the server is busy. Without `max_tokens` the reply may take `default` tokens
    (or all there is room for), within the room."""
    engine: Engine = request.app.state.engine
    limits: Limits = request.app.state.limits
    adapter = _adapter_for(request, body.model)
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
    stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
    if logprobs is not None and engine.batching == "static":
        raise APIError(400, "logprobs need continuous batching (this server runs --batching static)")
    json_mode = body.response_format is not None and body.response_format.type == "json_object"
    if json_mode and engine.batching == "static":
        raise APIError(
            400, "response_format json_object needs continuous batching (this server runs --batching static)"
        )
    jobs = []
    for i in range(body.n):  # choice i samples with seed + i: n different, reproducible replies
        seed = None if body.seed is None else (body.seed + i) % 2**64 if 0 <= body.seed < 2**64 else body.seed
        try:
            sampling = Sampling(
                max_tokens,
                body.temperature,
                body.top_p,
                seed,
                body.presence_penalty or 0.0,
                body.frequency_penalty or 0.0,
            )
        except ConfigError as e:
            raise APIError.of(e) from None
        jobs.append(Job(Row(ids, adapter, sampling), asyncio.get_running_loop(), stop, logprobs, json_mode))
    try:
        for job in jobs:
            engine.submit(job)
    except Overloaded as e:
        for job in jobs:
            job.cancelled.set()
        retry = {"Retry-After": str(request.app.state.retry_after)}
        raise APIError(e.status, e.message, code="server_busy", headers=retry) from None
    return jobs


@public.get("/health")
async def health(request: Request):
    engine: Engine = request.app.state.engine
    if not engine.alive:  # requests would wait for nobody: tell load balancers
        return JSONResponse({"status": "stopped"}, status_code=503)
    return {
        "status": "ok",
        "queued": len(engine.waiting),
        "in_flight": engine.in_flight(),
        "loaded_adapters": engine.cache.loaded_names(),
    }


@private.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    engine: Engine = request.app.state.engine
    waiting = {a or "": n for a, n in engine.waiting.sizes().items()}
    text = engine.metrics.render(
        {
            "lorakit_queue_depth": ("requests waiting to start", len(engine.waiting)),
            "lorakit_queue_depth_by_adapter": ("requests waiting, by adapter", waiting),
            "lorakit_requests_in_flight": ("requests waiting or running", engine.in_flight()),
            "lorakit_rows_in_flight": ("rows admitted to the batch", engine.rows()),
            "lorakit_loaded_adapters": ("adapters on the model", len(engine.cache.loaded_names())),
            "lorakit_loaded_adapter_bytes": ("bytes of loaded adapters", engine.cache.loaded_bytes()),
        }
    )
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


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
    jobs = _make_jobs(request, body, ids, body.max_tokens, "prompt", default=16, logprobs=body.logprobs)
    tok = engine.tokenizer

    def chunk(i: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None) -> dict:
        return {
            "index": i,
            "text": text,
            "finish_reason": finish,
            "logprobs": completion_logprobs(tok, logprobs),
        }

    return await respond(request, jobs, body, "text_completion", "cmpl", chunk, chunk, len(ids))


@private.post("/v1/chat/completions")
async def chat(request: Request):
    body = await read_body(request, ChatBody)
    messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
    tok = request.app.state.engine.tokenizer
    try:
        ids = prompt_ids(tok, messages)
    except ConfigError as e:  # no chat template, or one that rejects the roles
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    # max_completion_tokens supersedes max_tokens (OpenAI); 0 is a value, not "unset"
    wanted = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    jobs = _make_jobs(request, body, ids, wanted, "messages", logprobs=logprobs)

    def chunk(key: str) -> Callable:
        def make(i: int, text: str, finish: str | None, lps: list[TokenLogprob] | None) -> dict:
            return {
                "index": i,
                key: {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": chat_logprobs(tok, lps),
            }

        return make

    return await respond(
        request, jobs, body, "chat.completion", "chatcmpl", chunk("delta"), chunk("message"), len(ids)
    )


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


@private.post("/v1/load_lora_adapter")
async def load_lora(request: Request) -> PlainTextResponse:
    """vLLM's endpoint: load `lora_path` (inside --adapter-dir; default `lora_name`) as `lora_name`."""
    body = await read_body(request, LoadLoraBody)
    engine: Engine = request.app.state.engine
    if body.lora_name == request.app.state.base_name:
        raise APIError(400, f"{body.lora_name!r} is the base model's id", param="lora_name")
    if body.lora_name in engine.cache.loaded_names():  # vLLM's answer
        raise APIError(
            400, f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name"
        )
    await _admin(lambda name: engine.add_adapter(name, body.lora_path), body.lora_name, "lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@private.post("/v1/unload_lora_adapter")
async def unload_lora(request: Request) -> PlainTextResponse:
    """vLLM's endpoint: forget `lora_name` (rows using it finish first)."""
    body = await read_body(request, UnloadLoraBody)
    await _admin(request.app.state.engine.remove_adapter, body.lora_name, "lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def _admin(action: Callable[[str], None], name: str, param: str = "name") -> None:
    try:
        await asyncio.to_thread(action, name)  # the files are read here, the model changes between steps
    except NoRoom as e:
        raise APIError(503, str(e), headers={"Retry-After": "1"}) from None
    except LorakitError as e:
        code = "model_not_found" if http_status(e) == 404 else None
        raise APIError.of(e, param=param, code=code) from None
