"""The replies of the completion routes: the events of a request's jobs (one per choice) turned
into one OpenAI JSON object or a stream of server-sent events, with OpenAI's `logprobs` objects.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .bodies import APIError, Body
from .engine import Done, Event, Failed, Text, TokenLogprob
from .engine import Request as Job


async def events_of(
    request: Request, jobs: list[Job], watch: bool
) -> AsyncIterator[tuple[int, Event | None]]:
    """(choice, event) as the jobs produce them, until each has ended; (-1, None) if the client
    went away (`watch`; the jobs are then cancelled). A stream does not watch: Starlette ends it
    when a send to a gone client fails. Every job still running is cancelled on the way out."""
    gets = {asyncio.ensure_future(job.events.get()): i for i, job in enumerate(jobs)}
    try:
        while gets:
            done, _ = await asyncio.wait(gets, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                if watch and await request.is_disconnected():
                    yield -1, None
                    return
                if not request.app.state.engine.alive:
                    yield 0, Failed(503, "the server's generation worker has stopped; retry later")
                    return
            for task in sorted(done, key=gets.get):
                i = gets.pop(task)
                event = task.result()
                if isinstance(event, Text):
                    gets[asyncio.ensure_future(jobs[i].events.get())] = i
                yield i, event
    finally:
        for task in gets:
            task.cancel()
        for job in jobs:
            job.cancelled.set()  # a job that has ended ignores it


async def respond(
    request: Request, jobs: list[Job], body: Body, kind: str, prefix: str, delta, whole, n_prompt: int
):
    """The reply to `jobs` (one per choice): one JSON object, or server-sent events when `body.stream`."""
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    events = events_of(request, jobs, watch=not body.stream)
    # wait for the first event before answering, so an error before any output gets its status
    i, first = await anext(events)
    if isinstance(first, Failed):
        await events.aclose()
        raise APIError(first.status, first.message)
    if first is None:
        return JSONResponse({}, status_code=499)
    if body.stream:
        usage = n_prompt if body.stream_options and body.stream_options.include_usage else None
        return StreamingResponse(
            _stream(events, (i, first), head, kind, delta, len(jobs), usage), media_type="text/event-stream"
        )
    pieces: list[list[str]] = [[] for _ in jobs]
    logprobs: list[list[TokenLogprob]] = [[] for _ in jobs]
    ends: dict[int, Done] = {}
    event = first
    while True:
        if event is None:
            return JSONResponse({}, status_code=499)
        if isinstance(event, Failed):
            await events.aclose()
            raise APIError(event.status, event.message)
        if isinstance(event, Text):
            pieces[i].append(event.piece)
            logprobs[i] += event.logprobs
        else:
            ends[i] = event
        try:
            i, event = await anext(events)
        except StopAsyncIteration:
            break
    wants = jobs[0].logprobs is not None
    choices = [
        whole(j, "".join(pieces[j]), ends[j].finish_reason, logprobs[j] if wants else None)
        for j in range(len(jobs))
    ]
    n = sum(d.completion_tokens for d in ends.values())
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
    return {**head, "object": kind, "choices": choices, "usage": usage}


async def _stream(
    events, first: tuple, head: dict, kind: str, chunk, n: int, n_prompt: int | None
) -> AsyncIterator[str]:
    """The server-sent events; with `n_prompt` (include_usage) a last chunk holds the usage."""
    obj = kind + ".chunk" if kind == "chat.completion" else kind
    i, event = first
    ended = tokens = 0
    try:
        while True:
            if isinstance(event, Text):
                lps = list(event.logprobs) if event.logprobs else None
                yield _sse({**head, "object": obj, "choices": [chunk(i, event.piece, None, lps)]})
            elif isinstance(event, Done):
                yield _sse({**head, "object": obj, "choices": [chunk(i, "", event.finish_reason, None)]})
                ended, tokens = ended + 1, tokens + event.completion_tokens
                if ended == n:
                    if n_prompt is not None:
                        usage = {"prompt_tokens": n_prompt, "completion_tokens": tokens}
                        usage["total_tokens"] = n_prompt + tokens
                        yield _sse({**head, "object": obj, "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                    return
            else:  # the status line is sent already: the error goes in the stream
                yield _sse(APIError(event.status, event.message).body())
                return
            i, event = await anext(events)
    finally:  # normal end, or the client went away (the response task is cancelled)
        await events.aclose()


def completion_logprobs(tok, logprobs: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's legacy completions `logprobs` object for `logprobs` (None: not asked for)."""
    if logprobs is None:
        return None
    tokens = [tok.decode([t.token]) for t in logprobs]
    offsets = [sum(len(x) for x in tokens[:k]) for k in range(len(tokens))]
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{tok.decode([i]): lp for i, lp in t.top} for t in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(tok, logprobs: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat `logprobs` object (`content`: token, logprob, bytes, top_logprobs)."""
    if logprobs is None:
        return None

    def one(token: int, logprob: float) -> dict:
        text = tok.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**one(t.token, t.logprob), "top_logprobs": [one(i, lp) for i, lp in t.top]} for t in logprobs
        ]
    }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
