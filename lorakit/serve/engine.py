"""The dynamic batcher: one worker thread owns the model and serves every request.

Requests enter a bounded queue (`submit` raises `queue.Full` rather than letting it grow). The
worker takes the first waiting request, waits up to `wait_ms` for more (at most `max_batch`, and
no more distinct adapters than the cache holds), loads their adapters, and runs them as one
mixed-adapter batch through `lorakit.generate.generate_tokens`: the same code path as
`lorakit generate`. Text pieces go back to each request's asyncio queue as they are produced; a
request whose client went away is cancelled at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from torch import nn

from ..errors import LorakitError
from ..generate import Row, TextStream, eos_ids, generate_tokens
from .cache import AdapterCache

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One generation: its row, its stop strings, and where its events go.

    Events: ("text", piece), ("done", finish_reason, completion_tokens), ("error", status, message).
    """

    row: Row
    loop: asyncio.AbstractEventLoop
    stop: list[str] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Output:
    """A request's text so far; holds back text that could be the start of a stop string."""

    def __init__(self, request: Request, tokenizer) -> None:
        self.request, self.stream, self.sent, self.tokens = request, TextStream(tokenizer), 0, 0
        self.hold = max((len(s) for s in request.stop), default=1) - 1
        self.stopped = False

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
            self.request.send("done", reason, self.tokens)
        return reason

    def _emit(self, upto: str) -> None:
        if len(upto) > self.sent:
            self.request.send("text", upto[self.sent :])
            self.sent = len(upto)


class Engine:
    """Owns `model`: batches submitted requests, loads their adapters through `cache`, generates."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cache: AdapterCache,
        max_batch: int = 8,
        wait_ms: float = 10.0,
        max_queue: int = 64,
    ) -> None:
        self.model, self.tokenizer, self.cache = model.eval(), tokenizer, cache
        self.max_batch, self.wait_s = max_batch, wait_ms / 1000
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()  # held whenever the model is used or its adapters change
        self.eos = eos_ids(model, tokenizer)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._pending: collections.deque[Request] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0  # statistics, for /health and tests
        self.max_rows_seen = 0
        self.cancelled = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue `request`; raises `queue.Full` when the queue is at its limit."""
        self.queue.put_nowait(request)

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self._run(batch)

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
            except LorakitError as e:
                log.error("adapter %s: %s", name, e)
                for r in batch:
                    if r.row.adapter == name:
                        r.send("error", 500, f"adapter {name!r} could not be loaded: {e}")
        return [r for r in batch if r.row.adapter is None or r.row.adapter in ready]

    def _run(self, batch: list[Request]) -> None:
        finished: set[int] = set()
        try:
            with self.lock:
                batch = self._load_adapters(batch)
                outputs = [_Output(r, self.tokenizer) for r in batch]
                self.batches += 1
                self.max_rows_seen = max(self.max_rows_seen, len(batch))
                for i, token, reason in generate_tokens(
                    self.model,
                    [r.row for r in batch],
                    self.eos,
                    self.pad,
                    cancelled=lambda i: batch[i].cancelled.is_set() or outputs[i].stopped,
                ):
                    if token is not None:
                        outputs[i].push(token)
                    else:
                        self.cancelled += outputs[i].finish(reason) == "cancelled"
                        finished.add(i)
        except LorakitError as e:
            self._fail(batch, finished, 400 if isinstance(e, ValueError) else 500, str(e))
        except Exception as e:  # keep serving: report it to the batch's clients and log it
            log.exception("generation failed")
            self._fail(batch, finished, 500, f"internal error: {type(e).__name__}")

    @staticmethod
    def _fail(batch: list[Request], finished: set[int], status: int, message: str) -> None:
        for i, r in enumerate(batch):
            if i not in finished:
                r.send("error", status, message)
