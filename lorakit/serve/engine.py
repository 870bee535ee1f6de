"""The dynamic batcher: one worker thread owns the model and serves every request.

Requests enter a bounded queue (`submit` raises `queue.Full` rather than letting it grow). The
worker takes the first waiting request, waits up to `wait_ms` for more (at most `max_batch`, and
no more distinct adapters than the cache holds), loads their adapters, and runs them as one
mixed-adapter batch through `lorakit.generate.generate_tokens`: the same code path as
`lorakit generate`. Events (`Text`, `Done`, `Failed`) go back to each request's asyncio queue as
they are produced; a request whose client went away is cancelled at the next step.

One request's error never reaches another: a request whose adapter fails to load fails alone, and
a batch that fails is run again request by request (each that has not streamed anything yet), so
only the request at fault gets the error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import ConfigError, LorakitError, http_status
from ..generate import Row, TextStream, context_length, eos_ids, generate_tokens
from .cache import AdapterCache, AdapterLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Text:
    """A new piece of a request's reply."""

    piece: str


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
    """One generation: its row (`row.adapter` is the served adapter name), its stop strings, and
    the asyncio queue its `Event`s go to."""

    row: Row
    loop: asyncio.AbstractEventLoop
    stop: list[str] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event: Event) -> None:
        """Hand `event` to the request's event loop (from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down): nobody left to tell
            pass


class _Output:
    """A request's text so far; holds back text that could be the start of a stop string."""

    def __init__(self, request: Request, tokenizer) -> None:
        self.request, self.stream, self.sent, self.tokens = request, TextStream(tokenizer), 0, 0
        self.hold = max((len(s) for s in request.stop), default=1) - 1
        self.stopped = self.finished = False

    def push(self, token: int) -> None:
        self.tokens += 1
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
        if reason != "cancelled":  # a cancelled request's client is gone: nobody to tell
            self.request.send(Done(reason, self.tokens))
        self.finished = True
        return reason

    def _emit(self, upto: str) -> None:
        if len(upto) > self.sent:
            self.request.send(Text(upto[self.sent :]))
            self.sent = len(upto)


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
    ) -> None:
        self.check_settings(max_batch, wait_ms, max_queue)
        self.model, self.tokenizer, self.cache = model.eval(), tokenizer, cache
        self.max_batch, self.wait_s = max_batch, wait_ms / 1000
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()  # held whenever the model is used or its adapters change
        self.eos = eos_ids(model, tokenizer)
        embedding = model.get_input_embeddings()  # maybe wrapped by an embedding adapter
        self.vocab_size = getattr(embedding, "base_layer", embedding).num_embeddings
        self.context_length = context_length(model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._pending: collections.deque[Request] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0  # statistics, for /health and tests
        self.max_rows_seen = 0
        self.cancelled = 0

    @staticmethod
    def check_settings(max_batch: int, wait_ms: float, max_queue: int) -> None:
        """Raise `ConfigError` unless the batch and queue sizes are at least 1 and `wait_ms` is a
        finite number >= 0 (a `queue.Queue` of size 0 would be unbounded, not empty)."""
        for flag, value in (("max_batch (--max-batch)", max_batch), ("max_queue (--max-queue)", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a whole number of at least 1, got {value!r}")
        if isinstance(wait_ms, bool) or not isinstance(wait_ms, int | float) or not 0 <= wait_ms < math.inf:
            raise ConfigError(f"wait_ms (--batch-wait-ms) must be a finite number >= 0, got {wait_ms!r}")

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._work, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the worker to stop after its batch and wait for it (at most 30 s)."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running (requests get answers)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> None:
        """Queue `request`; raises `queue.Full` when the queue is at its limit."""
        self.queue.put_nowait(request)

    def add_adapter(self, name: str) -> None:
        """Register and load `adapter_dir/name` between batches (see `AdapterCache.add`)."""
        with self.lock:
            self.cache.add(name)

    def remove_adapter(self, name: str) -> None:
        """Unload and forget `name` between batches (see `AdapterCache.remove`)."""
        with self.lock:
            self.cache.remove(name)

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - the worker must outlive any batch
                log.exception("batch failed")
                for r in batch:  # a request that was answered already ignores this
                    r.send(Failed(500, f"internal error: {type(e).__name__}"))

    def _next(self, timeout: float) -> Request | None:
        if self._pending:
            return self._pending.popleft()
        try:
            return self.queue.get(timeout=max(timeout, 0.0001))
        except queue.Empty:
            return None

    def _collect(self) -> list[Request]:
        """Up to `max_batch` live requests arriving within the wait window, within the cache size."""
        first = self._next(0.1)
        if first is None:
            return []
        batch, deferred, adapters = [], [], set()
        deadline = time.monotonic() + self.wait_s
        request = first
        while request is not None:
            name = request.row.adapter
            if request.cancelled.is_set():
                pass
            elif name is not None and name not in adapters and len(adapters) >= self.cache.capacity:
                deferred.append(request)  # its adapter would not fit in memory with the others
            else:
                batch.append(request)
                if name is not None:
                    adapters.add(name)
            if len(batch) >= self.max_batch:
                break
            request = self._next(deadline - time.monotonic())
        self._pending.extendleft(reversed(deferred))
        return batch

    def _load_adapters(self, batch: list[Request]) -> list[Request]:
        """Load the batch's adapters; requests whose adapter fails to load get an error and leave."""
        ready: list[str] = []
        for name in dict.fromkeys(r.row.adapter for r in batch if r.row.adapter):
            try:
                self.cache.ensure([*ready, name])
                ready.append(name)
            except Exception as e:  # noqa: BLE001 - only this adapter's requests may fail
                log.error("adapter %s: %s", name, e)
                failed = e if isinstance(e, LorakitError) else AdapterLoadError(f"adapter {name!r}: {e}")
                for r in batch:
                    if r.row.adapter == name:
                        r.send(Failed(http_status(failed), str(failed)))
        return [r for r in batch if r.row.adapter is None or r.row.adapter in ready]

    def _run(self, batch: list[Request]) -> None:
        """Generate for `batch`. If it fails, each request that has not seen any output yet runs
        again alone, so one request's error reaches that request only; a request that already
        streamed text cannot be restarted and gets the error."""
        if not batch:
            return
        with self.lock:
            batch = self._load_adapters(batch)
            outputs = [_Output(r, self.tokenizer) for r in batch]
            error = self._generate(batch, outputs)
        if error is None:
            return
        for request, out in zip(batch, outputs):
            if out.finished:
                continue
            if len(batch) > 1 and out.sent == 0:
                self._run([request])
            else:
                request.send(error)

    def _generate(self, batch: list[Request], outputs: list[_Output]) -> Failed | None:
        """Run `batch` to the end (the lock held); the failure, if any."""
        if not batch:
            return None
        self.batches += 1
        self.max_rows_seen = max(self.max_rows_seen, len(batch))
        try:
            rows = [replace(r.row, adapter=r.row.adapter and self.cache.key(r.row.adapter)) for r in batch]
            for i, token, reason in generate_tokens(
                self.model,
                rows,
                self.eos,
                self.pad,
                cancelled=lambda i: batch[i].cancelled.is_set() or outputs[i].stopped,
            ):
                if token is not None:
                    outputs[i].push(token)
                else:
                    self.cancelled += outputs[i].finish(reason) == "cancelled"
        except LorakitError as e:
            return Failed(http_status(e), str(e))
        except Exception as e:  # noqa: BLE001 - keep serving: report it to the clients and log it
            log.exception("generation failed")
            return Failed(500, f"internal error: {type(e).__name__}")
        return None
