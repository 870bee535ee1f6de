"""The requests waiting for the engine: bounded in total and per adapter, taken in arrival order
(static batching) or round-robin by adapter (continuous batching), so a flood of requests on one
adapter waits behind its own queue instead of starving the other adapters.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any


class Overloaded(Exception):
    """No room for a request: HTTP `status` (503: the server's queue is full or it is stopping;
    429: this adapter's share of the queue is full) and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Waiting:
    """At most `limit` waiting requests, at most `per_adapter` of them for one adapter (the
    request's `row.adapter`; None is the base model). Thread-safe."""

    def __init__(self, limit: int, per_adapter: int | None = None) -> None:
        self.limit, self.per_adapter = limit, per_adapter or limit
        self._cond = threading.Condition()
        self._queues: dict[Any, collections.deque] = {}  # adapter -> [(arrival number, request)]
        self._turn: collections.deque = collections.deque()  # adapters with requests, next first
        self._count = itertools.count()
        self.closed = False

    def __len__(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def sizes(self) -> dict[Any, int]:
        """Waiting requests per adapter."""
        with self._cond:
            return {a: len(q) for a, q in self._queues.items()}

    def put(self, request, front: bool = False) -> None:
        """Queue `request` (`front`: a request taken earlier goes back first, beyond the limits).
        Raises `Overloaded` when a limit is reached or the queue is closed."""
        adapter = request.row.adapter
        with self._cond:
            if not front:
                if self.closed:
                    raise Overloaded(503, "the server is shutting down; retry on another replica")
                if sum(len(q) for q in self._queues.values()) >= self.limit:
                    raise Overloaded(503, "the server is busy (request queue full); retry later")
                if len(self._queues.get(adapter, ())) >= self.per_adapter:
                    raise Overloaded(429, f"too many requests waiting for {adapter or 'the base model'!r}")
            queue = self._queues.get(adapter)
            if queue is None:
                queue = self._queues[adapter] = collections.deque()
                self._turn.append(adapter)
            if front:
                queue.appendleft((-next(self._count), request))
            else:
                queue.append((next(self._count), request))
            self._cond.notify_all()

    def first(self, timeout: float):
        """The request that arrived first, waiting up to `timeout` seconds; None if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._queues:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if not self._queues:
                        return None
            adapter = min(self._queues, key=lambda a: self._queues[a][0][0])
            return self._pop(adapter)

    def take(self, fits: Callable[[Any], bool]):
        """The oldest request of the adapter whose turn it is, if `fits(request)`; else None (the
        turn is kept, so a large request is not overtaken for ever)."""
        with self._cond:
            if not self._turn:
                return None
            adapter = self._turn[0]
            if not fits(self._queues[adapter][0][1]):
                return None
            return self._pop(adapter)

    def wait(self, timeout: float, idle: bool = False) -> None:
        """Sleep until a request arrives, `wake` is called, or `timeout` seconds pass; unless
        `idle`, return at once while requests wait."""
        with self._cond:
            if idle or not self._queues:
                self._cond.wait(timeout)

    def wake(self) -> None:
        """Wake a `wait`ing thread (work other than requests has arrived)."""
        with self._cond:
            self._cond.notify_all()

    def refuse_new(self) -> None:
        """Refuse new requests from now on (those waiting stay)."""
        with self._cond:
            self.closed = True

    def close(self) -> list:
        """Refuse new requests from now on; return (and remove) those still waiting."""
        with self._cond:
            self.closed = True
            out = [r for q in self._queues.values() for _, r in q]
            self._queues.clear()
            self._turn.clear()
            self._cond.notify_all()
            return out

    def _pop(self, adapter):
        queue = self._queues[adapter]
        _, request = queue.popleft()
        self._turn.remove(adapter)
        if queue:
            self._turn.append(adapter)  # its next request waits for the other adapters' turns
        else:
            del self._queues[adapter]
        return request
