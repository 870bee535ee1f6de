"""Continuous batching: the engine thread schedules per decoding step.

Each turn of the loop (1) admits waiting requests, round-robin by adapter, while the caps on rows
(`max_batch`) and on tokens in flight (`max_batch_tokens`: each row's prompt plus `max_tokens`,
what its KV cache can grow to) allow; (2) prefills one chunk of the group of prompts being
prefilled (at most `prefill_chunk` tokens per forward, so a long prompt does not stall the
others' next token); a group whose prompts are done samples their first tokens and joins the
running rows (`lorakit.serve.batch.Batch`); (3) runs one decode step for every running row, each
with its own adapter (a mixed-adapter forward), sampling settings and penalties; finished rows
leave at once.

Adapters a request needs that are not loaded yet are read and checked on a loader thread; only the
short attach to the model runs between two steps (`Engine.between_steps`), so loading never stalls
the rows of other adapters for the file read. Adapters used by a row are pinned in the cache.

A prefill group that fails is split and each prompt prefilled alone, so only the request at fault
gets the error; a failing decode step fails its rows (they have streamed text already).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from dataclasses import dataclass, field

import torch

from ..errors import AdapterStateError, LorakitError
from ..generate import _seed, adapters_for_rows, cache_argument, choose_tokens
from .batch import Batch, check_cache
from .cache import AdapterLoadError, NoRoom
from .engine import Failed, Request, TokenLogprob, _Output, failure
from .json_mode import JsonRow

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    """A request in flight: its output, its adapter's model key once loaded, its sampler."""

    request: Request
    out: _Output
    ready: bool = False  # its adapter is on the model (`key`), or it uses the base model
    key: str | None = None
    alone: bool = False  # prefill it alone (its group failed)
    history: list[int] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=torch.Generator)
    json: JsonRow | None = None  # JSON mode: what keeps the reply a JSON object

    @property
    def budget(self) -> int:
        row = self.request.row
        return len(row.prompt_ids) + row.sampling.max_tokens


class _Prefill:
    """A group of prompts, left-padded to one length, prefilled `done` columns so far."""

    def __init__(self, seqs: list[_Seq], pad: int, device: torch.device) -> None:
        self.seqs, self.done, self.cache = seqs, 0, None
        prompts = [s.request.row.prompt_ids for s in seqs]
        self.length = max(map(len, prompts))
        self.ids = torch.full((len(seqs), self.length), pad, dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)
        for i, p in enumerate(prompts):
            self.ids[i, self.length - len(p) :] = torch.tensor(p, dtype=torch.long)
            self.mask[i, self.length - len(p) :] = 1
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.next_positions = torch.tensor([len(p) for p in prompts], device=device)


class Continuous:
    """The per-step scheduler of `engine` (see the module docstring); runs on the engine thread."""

    def __init__(self, engine) -> None:
        self.e = engine
        self.ready: list[_Seq] = []  # admitted, waiting for their adapter or their prefill
        self.prefill: _Prefill | None = None
        self.running: list[_Seq] = []
        self.batch: Batch | None = None
        self.loads: dict[str, str] = {}  # adapter name -> "loading" or "noroom"
        self.load_errors: dict[str, Failed] = {}
        self.left = False  # a row left since the last look at "noroom" loads
        self.loader = concurrent.futures.ThreadPoolExecutor(1, "lorakit-loader")
        self.cache_kw = cache_argument(engine.model)
        self.device = next(engine.model.parameters()).device
        self.routed: tuple | None = None
        self.route_stack = contextlib.ExitStack()
        self.guard = threading.Lock()  # the lists above, for `rows` and `pinned` from other threads
        self.texts: dict[int, str] = {}  # token -> its text alone (JSON mode)
        self.probe()

    def probe(self) -> None:
        """Raise `ConfigError` now, not at the first request, if the model's cache cannot be re-packed."""
        with torch.no_grad():
            out = self.e.model(input_ids=torch.tensor([[self.e.pad]], device=self.device), use_cache=True)
        check_cache(getattr(out, self.cache_kw))

    def seqs(self) -> list[_Seq]:
        """The rows admitted: waiting for their prefill, being prefilled, running (or ended and
        not yet dropped from the batch: their adapters stay pinned until then)."""
        with self.guard:
            return [*self.ready, *(self.prefill.seqs if self.prefill else []), *self.running]

    def rows(self) -> int:
        """Requests admitted and not finished."""
        return sum(not s.out.finished for s in self.seqs())

    def pinned(self) -> set[str]:
        return {s.key for s in self.seqs() if s.key}

    def run(self, stop: threading.Event) -> None:
        """The loop, until `stop` is set."""
        with torch.no_grad():
            while not stop.is_set():
                self.admit()
                if not self.seqs() and not self.e._tasks:
                    self.e.waiting.wait(0.05)
                    continue
                with self.e.lock:
                    if self.e._tasks:
                        self.compact()  # rows that ended release their adapters
                        self.unroute()  # the model's adapters may change: no routing in place
                        self.e.run_tasks()
                    worked = self.step()
                if not worked:  # only loads to wait for
                    self.e.waiting.wait(0.01, idle=True)
        with self.e.lock:
            self.unroute()
        self.loader.shutdown(wait=False, cancel_futures=True)

    def cancel_all(self, event: Failed) -> None:
        """Fail every request admitted and not finished (shutdown)."""
        for s in self.seqs():
            if not s.out.finished:
                s.out.fail(event)
        with self.guard:
            self.ready, self.prefill, self.running, self.batch = [], None, [], None

    def admit(self) -> None:
        tokens = sum(s.budget for s in self.seqs() if not s.out.finished)

        def fits(request: Request) -> bool:
            budget = len(request.row.prompt_ids) + request.row.sampling.max_tokens
            return tokens == 0 or tokens + budget <= self.e.max_batch_tokens

        while self.rows() < self.e.max_batch:
            request = self.e.waiting.take(fits)
            if request is None:
                return
            if request.cancelled.is_set():
                self.e.cancelled += 1
                continue
            seq = _Seq(request, _Output(request, self.e.tokenizer, self.e.metrics))
            seq.generator.manual_seed(_seed(request.row.sampling.seed))
            seq.ready = request.row.adapter is None
            if request.json_mode:
                seq.json = JsonRow(self.text_of, self.e.eos)
            tokens += seq.budget
            with self.guard:
                self.ready.append(seq)

    def step(self) -> bool:
        """One turn under the model lock; whether a forward ran."""
        self.resolve()
        with self.guard:
            if self.prefill is None:
                self.prefill = self.next_group()
        worked = False
        if self.prefill is not None:
            self.prefill_chunk()
            worked = True
        if self.running:
            self.decode()
            worked = True
        if self.e.cache.draining - self.pinned():  # removed adapters no row uses any more
            self.unroute()
            self.e.cache.drain(self.pinned())
        return worked

    # adapters -------------------------------------------------------------------------------

    def resolve(self) -> None:
        """Give admitted requests their adapter's key, start loads, fail those that cannot load."""
        if self.left:
            self.loads = {n: s for n, s in self.loads.items() if s != "noroom"}
            self.left = False
        for seq in [s for s in self.ready if not s.ready]:
            name = seq.request.row.adapter
            if name in self.load_errors:
                self.finish(seq, fail=self.load_errors[name])
            elif name not in self.e.cache:  # removed while it waited
                self.finish(seq, fail=failure(AdapterStateError(f"adapter {name!r} was unloaded")))
            elif name in self.e.cache.loaded:
                seq.key, seq.ready = self.e.cache.load(name), True
            elif name not in self.loads:
                self.loads[name] = "loading"
                self.loader.submit(self.read, name)
        self.load_errors.clear()  # the next request for a failed adapter tries again

    def read(self, name: str) -> None:
        """On the loader thread: read and check the files, then attach between steps."""
        try:
            self.e.cache.precheck(name)
        except Exception as e:  # noqa: BLE001 - only this adapter's requests may fail
            self.e.between_steps(lambda error=e: self.loaded(name, error))
            return
        self.e.between_steps(lambda: self.attach(name))

    def attach(self, name: str) -> None:
        try:
            self.e.cache.load(name, self.pinned())
        except NoRoom:
            self.loads[name] = "noroom"  # tried again once a row has left
            return
        except Exception as e:  # noqa: BLE001
            self.loaded(name, e)
            return
        self.loads.pop(name, None)

    def loaded(self, name: str, error: Exception) -> None:
        log.error("adapter %s: %s", name, error)
        if isinstance(error, LorakitError) and not isinstance(error, AdapterStateError | AdapterLoadError):
            error = AdapterLoadError(f"adapter {name!r} could not be loaded: {error}")
        self.load_errors[name] = failure(error, name)
        self.loads.pop(name, None)

    def route(self, keys: list[str | None]) -> None:
        """Route the model's rows to adapter `keys` (kept while the rows stay the same)."""
        if tuple(keys) != self.routed:
            self.unroute()
            self.route_stack.enter_context(adapters_for_rows(self.e.model, keys))
            self.routed = tuple(keys)

    def unroute(self) -> None:
        self.route_stack.close()
        self.routed = None

    # forwards -------------------------------------------------------------------------------

    def next_group(self) -> _Prefill | None:
        """The next prompts to prefill together: ready ones in admission order, while the group
        padded to its longest prompt stays within one chunk (a long prompt goes alone)."""
        group: list[_Seq] = []
        longest = 0
        for seq in [s for s in self.ready if s.ready]:
            n = max(longest, len(seq.request.row.prompt_ids))
            if group and (seq.alone or group[0].alone or (len(group) + 1) * n > self.e.prefill_chunk):
                break
            group.append(seq)
            longest = n
        if not group:
            return None
        self.ready = [s for s in self.ready if s not in group]
        self.e.batches += 1
        return _Prefill(group, self.e.pad, self.device)

    def forward(self, keys, ids, mask, positions, cache):
        self.route(keys)
        self.e.max_rows_seen = max(self.e.max_rows_seen, ids.shape[0])
        out = self.e.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **({} if cache is None else {self.cache_kw: cache}),
        )
        return out.logits[:, -1], getattr(out, self.cache_kw)

    def prefill_chunk(self) -> None:
        p = self.prefill
        end = min(p.length, p.done + max(1, self.e.prefill_chunk // len(p.seqs)))
        try:
            logits, p.cache = self.forward(
                [s.key for s in p.seqs],
                p.ids[:, p.done : end],
                p.mask[:, :end],
                p.positions[:, p.done : end],
                p.cache,
            )
        except Exception as e:  # noqa: BLE001 - find the request at fault: prefill each alone
            if not isinstance(e, LorakitError):
                log.exception("prefill failed")
            with self.guard:
                self.prefill = None
                if len(p.seqs) > 1:
                    for s in p.seqs:
                        s.alone = True
                    self.ready = p.seqs + self.ready
                    return
            self.finish(p.seqs[0], fail=failure(e))
            return
        p.done = end
        if end < p.length:
            return
        batch = Batch(p.cache, p.mask, p.next_positions)
        keep = self.emit(p.seqs, logits)
        with self.guard:
            self.prefill = None
            if not keep:
                return
            if len(keep) < len(p.seqs):
                batch.select(keep)
            joined = [p.seqs[i] for i in keep]
        self.compact()  # the routing changes anyway: drop the rows that have ended
        with self.guard:
            if self.batch is None:
                self.batch, self.running = batch, joined
            else:
                self.batch.extend(batch)
                self.running = self.running + joined

    def decode(self) -> None:
        """One token for every running row. A row that ends stays in the batch, fed but ignored,
        until a group joins or dead rows outnumber live ones: re-packing the batch copies every
        layer's KV cache (a routing change itself only re-indexes the layers' adapter stacks)."""
        for s in self.running:
            if not s.out.finished and s.request.cancelled.is_set():
                self.finish(s, "cancelled")
        live = [i for i, s in enumerate(self.running) if not s.out.finished]
        if 2 * len(live) < len(self.running):
            self.compact()
            live = list(range(len(self.running)))
        seqs, batch = self.running, self.batch
        if not seqs:
            return
        ids = torch.tensor([s.history[-1] for s in seqs], device=self.device)[:, None]
        positions = batch.positions[:, None]
        batch.grow()
        try:
            logits, batch.cache = self.forward([s.key for s in seqs], ids, batch.mask, positions, batch.cache)
        except Exception as e:  # noqa: BLE001 - these rows have streamed text: they fail
            log.exception("decode step failed")
            for s in seqs:
                if not s.out.finished:
                    self.finish(s, fail=failure(e))
            with self.guard:
                self.running, self.batch = [], None
            return
        self.emit([seqs[i] for i in live], logits[live])
        if all(s.out.finished for s in seqs):
            self.compact()

    def compact(self) -> None:
        """Drop the rows that have ended from the running batch."""
        live = [i for i, s in enumerate(self.running) if not s.out.finished]
        if len(live) == len(self.running):
            return
        with self.guard:
            if live:
                self.batch.select(live)
                self.running = [self.running[i] for i in live]
            else:
                self.running, self.batch = [], None

    def emit(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Sample each row's next token and hand it on; the rows that go on."""
        logits = logits.float()
        top = max((s.request.logprobs for s in seqs if s.request.logprobs is not None), default=None)
        logp = torch.log_softmax(logits, -1) if top is not None else None
        samplings = [s.request.row.sampling for s in seqs]
        tokens = choose_tokens(logits, samplings, [s.generator for s in seqs], [s.history for s in seqs])
        keep = []
        for j, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.json is not None and not seq.request.cancelled.is_set():
                try:  # JSON mode: the first choice that keeps the reply a JSON object
                    token = seq.json.choose(logits[j], samplings[j], seq.generator, token)
                except RuntimeError as e:
                    self.finish(seq, fail=failure(e))
                    continue
            reason = None
            if seq.request.cancelled.is_set():
                reason = "cancelled"
            elif token in self.e.eos:
                reason = "stop"
            else:
                seq.history.append(token)
                seq.out.push(token, self.logprob(seq, logp, j, token))
                if seq.out.stopped or (seq.json is not None and seq.json.done):
                    reason = "stop"
                elif len(seq.history) >= seq.request.row.sampling.max_tokens:
                    reason = "length"
            if reason:
                self.finish(seq, reason)
            else:
                keep.append(j)
        self.e.metrics.step(len(seqs))
        return keep

    def text_of(self, token: int) -> str:
        """`token`'s text decoded alone (cached)."""
        text = self.texts.get(token)
        if text is None:
            text = self.texts[token] = self.e.tokenizer.decode([token])
        return text

    @staticmethod
    def logprob(seq: _Seq, logp: torch.Tensor | None, row: int, token: int) -> TokenLogprob | None:
        k = seq.request.logprobs
        if k is None or logp is None:
            return None
        top = []
        if k:
            values, ids = logp[row].topk(k)
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(logp[row, token]), tuple(top))

    def finish(self, seq: _Seq, reason: str = "", fail: Failed | None = None) -> None:
        """End `seq`: done as `reason`, or failed with `fail`; it leaves the lists it is in."""
        if fail is not None:
            seq.out.fail(fail)
        else:
            self.e.cancelled += seq.out.finish(reason) == "cancelled"
        self.left = True
        with self.guard:
            if seq in self.ready:
                self.ready.remove(seq)
