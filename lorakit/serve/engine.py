"""The engine: one worker thread owns the model and serves every request.

Requests wait in a bounded queue (`lorakit.serve.waiting`: `submit` raises `Overloaded` rather
than letting it grow). Two ways to batch them:

- continuous (the default, `lorakit.serve.scheduler`): at every step finished rows leave and
  waiting requests join, round-robin by adapter, each step one packed forward over the running
  rows' next tokens and new prompts' chunks (`lorakit.serve.packed`);
- static (`batching="static"`): the worker takes the first waiting request, waits up to `wait_ms`
  for more (at most `max_batch`, and no more distinct adapters than the cache holds), loads their
  adapters, and runs them as one mixed-adapter batch to the end through
  `lorakit.generate.generate_tokens`, the same code path as `lorakit generate`.

Events (`Text`, `Done`, `Failed`) go back to each request's asyncio queue as they are produced; a
request whose client went away is cancelled at the next step. One request's error never reaches
another: a request whose adapter fails to load fails alone, and a batch that fails is run again
request by request (each that has not streamed anything yet), so only the request at fault gets
the error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError, LorakitError, http_status
from ..generate import Row, TextStream, context_length, eos_ids
from .cache import AdapterCache, AdapterLoadError
from .metrics import Metrics
from .waiting import Waiting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the `top` most likely tokens'."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Text:
    """A new piece of a request's reply (and, if asked for, its tokens' log-probabilities)."""

    piece: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    """The reply is complete: why it ended ("stop", "length") and how many tokens it has."""

    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed: the HTTP status (from `lorakit.errors.http_status`) and a message."""

    status: int
    message: str


Event = Text | Done | Failed


@dataclass
class Request:
    """One generation: its row (`row.adapter` is the served adapter name), its stop strings, how
    many top log-probabilities to report per token (None: none), and the asyncio queue its
    `Event`s go to."""

    row: Row
    loop: asyncio.AbstractEventLoop
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    json_mode: bool = False  # response_format json_object: the reply is kept a JSON object
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)

    def send(self, event: Event) -> None:
        """Hand `event` to the request's event loop (from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down): nobody left to tell
            pass


class _Output:
    """A request's text so far; holds back text that could be the start of a stop string."""

    def __init__(self, request: Request, tokenizer, metrics: Metrics | None = None) -> None:
        self.request, self.stream, self.sent, self.tokens = request, TextStream(tokenizer), 0, 0
        self.hold = max((len(s) for s in request.stop), default=1) - 1
        self.stopped = self.finished = False
        self.metrics, self.first_at = metrics, 0.0
        self.logprobs: list[TokenLogprob] = []  # not sent yet

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        if self.tokens == 0:
            self.first_at = time.monotonic()
            if self.metrics:
                r = self.request
                self.metrics.first_token(r.row.adapter, self.first_at - r.arrived, len(r.row.prompt_ids))
        self.tokens += 1
        if logprob is not None:
            self.logprobs.append(logprob)
        self.stream.push(token)
        text = self.stream.text
        hits = [i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.request.stop) if i >= 0]
        if hits:  # cut at the first stop string; the engine then ends the row as "stop"
            self._emit(text[: min(hits)])
            self.stopped = True
        else:
            self._emit(text[: len(text) - self.hold])

    def finish(self, reason: str) -> str:
        if self.stopped:
            reason = "stop"
        else:
            self._emit(self.stream.text)
        if self.logprobs:  # tokens whose text was empty or held back
            self.request.send(Text("", tuple(self.logprobs)))
        if reason != "cancelled":  # a cancelled request's client is gone: nobody to tell
            self.request.send(Done(reason, self.tokens))
        self.finished = True
        if self.metrics:
            decode_s = time.monotonic() - self.first_at if self.tokens else 0.0
            self.metrics.finished(self.request.row.adapter, reason, self.tokens, decode_s)
        return reason

    def fail(self, event: Failed) -> None:
        """End the request with an error."""
        self.request.send(event)
        self.finished = True
        if self.metrics:
            self.metrics.finished(self.request.row.adapter, "error", self.tokens, 0.0)

    def _emit(self, upto: str) -> None:
        if len(upto) > self.sent:
            self.request.send(Text(upto[self.sent :], tuple(self.logprobs)))
            self.sent = len(upto)
            self.logprobs = []


class Engine:
    """Owns `model`: batches submitted requests, loads their adapters through `cache`, generates.
    Raises `ConfigError` for bad settings (see `check_settings`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cache: AdapterCache,
        max_batch: int = 8,
        wait_ms: float = 10.0,
        max_queue: int = 64,
        batching: str = "continuous",
        max_batch_tokens: int = 16384,
        prefill_chunk: int = 512,
        max_queue_per_adapter: int | None = None,
    ) -> None:
        self.check_settings(max_batch, wait_ms, max_queue, batching, max_batch_tokens, prefill_chunk)
        self.model, self.tokenizer, self.cache = model.eval(), tokenizer, cache
        self.max_batch, self.wait_s, self.batching = max_batch, wait_ms / 1000, batching
        self.max_batch_tokens, self.prefill_chunk = max_batch_tokens, prefill_chunk
        self.waiting = Waiting(max_queue, max_queue_per_adapter)
        self.lock = threading.Lock()  # held whenever the model is used or its adapters change
        self.eos = eos_ids(model, tokenizer)
        embedding = model.get_input_embeddings()  # maybe wrapped by an embedding adapter
        self.vocab_size = getattr(embedding, "base_layer", embedding).num_embeddings
        self.context_length = context_length(model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.metrics = Metrics()
        self._tasks: list[tuple[Callable, concurrent.futures.Future]] = []  # run between steps
        self._tasks_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        from .scheduler import Continuous  # noqa: PLC0415 - both import this module
        from .static import Static  # noqa: PLC0415

        self._loop = Continuous(self) if batching == "continuous" else Static(self)
        self.batches = 0  # statistics for tests: static batches run, or continuous steps
        self.max_rows_seen = 0  # the most requests in one batch or step
        self.cancelled = 0

    @staticmethod
    def check_settings(
        max_batch: int,
        wait_ms: float,
        max_queue: int,
        batching: str = "continuous",
        max_batch_tokens: int = 16384,
        prefill_chunk: int = 512,
    ) -> None:
        """Raise `ConfigError` unless the batch, queue and token sizes are at least 1, `wait_ms`
        is a finite number >= 0 and `batching` is "continuous" or "static"."""
        for flag, value in (
            ("max_batch (--max-batch)", max_batch),
            ("max_queue (--max-queue)", max_queue),
            ("max_batch_tokens (--max-batch-tokens)", max_batch_tokens),
            ("prefill_chunk (--prefill-chunk)", prefill_chunk),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a whole number of at least 1, got {value!r}")
        if isinstance(wait_ms, bool) or not isinstance(wait_ms, int | float) or not 0 <= wait_ms < math.inf:
            raise ConfigError(f"wait_ms (--batch-wait-ms) must be a finite number >= 0, got {wait_ms!r}")
        if batching not in ("continuous", "static"):
            raise ConfigError(f"batching (--batching) must be 'continuous' or 'static', got {batching!r}")

    def start(self) -> None:
        """Start the worker thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self, deadline: float = 30.0) -> None:
        """Refuse new requests, let those in flight finish for up to `deadline` seconds, cancel
        the rest (they get a 503), and stop the worker."""
        self.waiting.refuse_new()
        end = time.monotonic() + deadline
        while self.alive and self.in_flight() and time.monotonic() < end:
            time.sleep(0.02)
        self._stop.set()
        self.waiting.wake()
        if self._thread:
            self._thread.join(timeout=30)
        self._loop.cancel_all(Failed(503, "the server shut down before this request finished"))
        for request in self.waiting.close():
            request.send(Failed(503, "the server shut down before this request started"))

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (requests get answers)."""
        return self._thread is not None and self._thread.is_alive()

    def rows(self) -> int:
        """Requests admitted to the batch and not finished (continuous batching; else 0 or 1
        batch)."""
        return self._loop.rows()

    def in_flight(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + self.rows()

    def submit(self, request: Request) -> None:
        """Queue `request`; raises `Overloaded` (a 503 or 429) when there is no room."""
        self.waiting.put(request)

    def between_steps(self, action: Callable[[], object]) -> concurrent.futures.Future:
        """Run `action` on the model between two decoding steps (or two static batches); the
        future holds its result or error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.batching == "static" or not self.alive:
            with self.lock:
                _settle(future, action)
        else:
            with self._tasks_lock:
                self._tasks.append((action, future))
            self.waiting.wake()
        return future

    def add_adapter(self, name: str, path: str | None = None) -> None:
        """Register and load `adapter_dir/name` (or `path` in it) between steps (see
        `AdapterCache.add`); its files are read and checked first, off the engine thread."""
        self.cache.precheck(name, path)
        self.between_steps(lambda: self.cache.add(name, self.pinned(), path)).result()

    def remove_adapter(self, name: str) -> None:
        """Forget `name` between steps; rows using it finish first (see `AdapterCache.remove`)."""
        self.between_steps(lambda: self.cache.remove(name, self.pinned())).result()

    def pinned(self) -> set[str]:
        """Model keys of the adapters rows use now (never evicted)."""
        return self._loop.pinned()

    def run_tasks(self) -> None:
        """Run the `between_steps` actions (the lock held)."""
        with self._tasks_lock:
            tasks, self._tasks = self._tasks, []
        for action, future in tasks:
            _settle(future, action)

    def _work(self) -> None:
        self._loop.run(self._stop)


def failure(e: Exception, adapter: str | None = None) -> Failed:
    """The `Failed` event for error `e` (an adapter's load error when `adapter` is given)."""
    if adapter is not None and not isinstance(e, LorakitError):
        e = AdapterLoadError(f"adapter {adapter!r}: {e}")
    if isinstance(e, LorakitError):
        return Failed(http_status(e), str(e))
    return Failed(500, f"internal error: {type(e).__name__}")


def _settle(future: concurrent.futures.Future, action: Callable[[], object]) -> None:
    try:
        future.set_result(action())
    except Exception as e:  # noqa: BLE001 - handed to the caller
        future.set_exception(e)
