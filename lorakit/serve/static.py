"""Static batching (`--batching static`): whole batches, run to the end.

The worker takes the first waiting request, waits up to `wait_ms` for more (at most `max_batch`,
and no more distinct adapters than the cache holds), loads their adapters, and runs them as one
mixed-adapter batch through `lorakit.generate.generate_tokens`, the same code path as
`lorakit generate`. Requests arriving meanwhile wait for the next batch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

from ..errors import LorakitError
from ..generate import generate_tokens
from .engine import Failed, Request, _Output, failure

log = logging.getLogger(__name__)


class Static:
    """The whole-batch loop of `engine`; runs on the engine thread."""

    def __init__(self, engine) -> None:
        self.e = engine
        self.batch: list[Request] = []

    def rows(self) -> int:
        """Requests in the batch running now."""
        return len(self.batch)

    def pinned(self) -> set[str]:
        return set()  # adapters change only between batches

    def cancel_all(self, event: Failed) -> None:
        """Fail the requests of the batch (shutdown; the batch has stopped)."""
        for request in self.batch:
            request.send(event)
        self.batch = []

    def run(self, stop: threading.Event) -> None:
        """The loop, until `stop` is set."""
        while not stop.is_set():
            batch = self._collect()
            self.batch = batch
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - the worker must outlive any batch
                log.exception("batch failed")
                for r in batch:  # a request that was answered already ignores this
                    r.send(Failed(500, f"internal error: {type(e).__name__}"))
            self.batch = []

    def _collect(self) -> list[Request]:
        """Up to `max_batch` live requests arriving within the wait window, within the cache size."""
        first = self.e.waiting.first(0.1)
        if first is None:
            return []
        batch, deferred, adapters = [], [], set()
        deadline = time.monotonic() + self.e.wait_s
        request = first
        while request is not None:
            name = request.row.adapter
            if request.cancelled.is_set():
                pass
            elif name is not None and name not in adapters and len(adapters) >= self.e.cache.capacity:
                deferred.append(request)  # its adapter would not fit in memory with the others
            else:
                batch.append(request)
                if name is not None:
                    adapters.add(name)
            if len(batch) >= self.e.max_batch:
                break
            request = self.e.waiting.first(max(deadline - time.monotonic(), 0.0))
        for request in reversed(deferred):
            self.e.waiting.put(request, front=True)
        return batch

    def _load_adapters(self, batch: list[Request]) -> list[Request]:
        """Load the batch's adapters; requests whose adapter fails to load get an error and leave."""
        ready: list[str] = []
        for name in dict.fromkeys(r.row.adapter for r in batch if r.row.adapter):
            try:
                self.e.cache.ensure([*ready, name])
                ready.append(name)
            except Exception as e:  # noqa: BLE001 - only this adapter's requests may fail
                log.error("adapter %s: %s", name, e)
                failed = failure(e, name)
                for r in batch:
                    if r.row.adapter == name:
                        r.send(failed)
        return [r for r in batch if r.row.adapter is None or r.row.adapter in ready]

    def _run(self, batch: list[Request]) -> None:
        """Generate for `batch`. If it fails, each request that has not seen any output yet runs
        again alone, so one request's error reaches that request only; a request that already
        streamed text cannot be restarted and gets the error."""
        if not batch:
            return
        with self.e.lock:
            self.e.run_tasks()
            batch = self._load_adapters(batch)
            outputs = [_Output(r, self.e.tokenizer, self.e.metrics) for r in batch]
            error = self._generate(batch, outputs)
        if error is None:
            return
        for request, out in zip(batch, outputs):
            if out.finished:
                continue
            if len(batch) > 1 and out.sent == 0:
                self._run([request])
            else:
                out.fail(error)

    def _generate(self, batch: list[Request], outputs: list[_Output]) -> Failed | None:
        """Run `batch` to the end (the lock held); the failure, if any."""
        if not batch:
            return None
        self.e.batches += 1
        self.e.max_rows_seen = max(self.e.max_rows_seen, len(batch))
        try:
            rows = [replace(r.row, adapter=r.row.adapter and self.e.cache.key(r.row.adapter)) for r in batch]
            for i, token, reason in generate_tokens(
                self.e.model,
                rows,
                self.e.eos,
                self.e.pad,
                cancelled=lambda i: batch[i].cancelled.is_set() or outputs[i].stopped,
            ):
                if token is not None:
                    outputs[i].push(token)
                    self.e.metrics.step(1)
                else:
                    self.e.cancelled += outputs[i].finish(reason) == "cancelled"
        except Exception as e:  # noqa: BLE001 - keep serving: report it to the clients and log it
            if not isinstance(e, LorakitError):
                log.exception("generation failed")
            return failure(e)
        return None
