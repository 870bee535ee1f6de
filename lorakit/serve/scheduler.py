"""Continuous batching: the engine thread schedules per step, every request's work in one forward.

Each turn of the loop (1) admits waiting requests, round-robin by adapter, while the caps on rows
(`max_batch`) and on tokens in flight (`max_batch_tokens`: each row's prompt plus `max_tokens`,
what its keys and values can grow to) allow; (2) runs one packed forward (`lorakit.serve.packed`)
over one token of every decoding row and up to `prefill_chunk` tokens of the prompts being
prefilled, each row with its own adapter, keys and values; (3) samples the next token of every row
whose last token it computed (decoding rows, and prompts it completed: their first token), each
with its own sampling settings and penalties. A row that ends leaves at once, and its keys and
values with it: nothing is re-packed or padded when rows join or leave.

Adapters a request needs that are not loaded yet are read and checked on a loader thread; only the
short attach to the model runs between two steps (`Engine.between_steps`), so loading never stalls
the rows of other adapters for the file read. Adapters used by a row are pinned in the cache. When
an adapter holds a layer that cannot be routed per token (`lorakit.mixed.per_token_blocker`), or
wraps the output head (the packed forward keeps only some positions' logits), the adapters take
turns: each step serves one adapter's rows.

A step that fails after feeding new prompts runs again without them, and each of those prompts is
then prefilled alone, so only the request at fault gets the error; a failing step of rows already
decoding fails them (they have streamed text).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from dataclasses import dataclass, field

import torch

from ..errors import AdapterStateError, ConfigError, LorakitError
from ..generate import _seed, adapters_for_rows, choose_tokens
from ..layers import LoraLayer, ModulesToSave
from ..mixed import per_token_blocker
from . import packed
from .cache import AdapterLoadError, NoRoom
from .engine import Failed, Request, TokenLogprob, _Output, failure
from .json_mode import JsonRow

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    """A request in flight: its output, its adapter's model key once loaded, its sampler, its keys
    and values' slot and how many of its tokens it holds (`done`: its prompt's prefilled part, then
    every token fed back). It decodes once it has a first token (`history`)."""

    request: Request
    out: _Output
    ready: bool = False  # its adapter is on the model (`key`), or it uses the base model
    key: str | None = None
    alone: bool = False  # prefill it alone (a step with it failed)
    history: list[int] = field(default_factory=list)
    generator: torch.Generator = field(default_factory=torch.Generator)
    json: JsonRow | None = None  # JSON mode: what keeps the reply a JSON object
    slot: int | None = None  # its keys and values in the scheduler's `KvSlots`
    done: int = 0

    @property
    def prompt(self) -> list[int]:
        return self.request.row.prompt_ids

    @property
    def budget(self) -> int:
        return len(self.prompt) + self.request.row.sampling.max_tokens


class Continuous:
    """The per-step scheduler of `engine` (see the module docstring); runs on the engine thread.
    Switches the model's attention to the packed one (`packed.use_packed`), which raises
    `ConfigError` for a model it cannot run."""

    def __init__(self, engine) -> None:
        self.e = engine
        self.seqs: list[_Seq] = []  # admitted and not finished, in admission order
        self.loads: dict[str, str] = {}  # adapter name -> "loading" or "noroom"
        self.load_errors: dict[str, Failed] = {}
        self.left = False  # a row left since the last look at "noroom" loads
        self.loader = concurrent.futures.ThreadPoolExecutor(1, "lorakit-loader")
        self.device = next(engine.model.parameters()).device
        self.routed: tuple | None = None
        self.route_stack = contextlib.ExitStack()
        self.guard = threading.Lock()  # `seqs`, for `rows` and `pinned` from other threads
        self.texts: dict[int, str] = {}  # token -> its text alone (JSON mode)
        self.mixable = True  # whether the model's adapters can be routed per token
        self.kv = packed.KvSlots(engine.max_batch)  # every admitted request's keys and values
        packed.use_packed(engine.model)
        self.adapters_changed()  # adapters the cache loaded before the engine

    def rows(self) -> int:
        """Requests admitted and not finished."""
        with self.guard:
            return len(self.seqs)

    def pinned(self) -> set[str]:
        with self.guard:
            return {s.key for s in self.seqs if s.key}

    def run(self, stop: threading.Event) -> None:
        """The loop, until `stop` is set."""
        with torch.no_grad():
            while not stop.is_set():
                self.admit()
                if not self.seqs and not self.e._tasks:
                    self.e.waiting.wait(0.05)
                    continue
                with self.e.lock:
                    if self.e._tasks:
                        self.unroute()  # the model's adapters may change: no routing in place
                        self.e.run_tasks()
                        self.adapters_changed()
                    worked = self.step()
                if not worked:  # only loads to wait for
                    self.e.waiting.wait(0.01, idle=True)
        with self.e.lock:
            self.unroute()
        self.loader.shutdown(wait=False, cancel_futures=True)

    def cancel_all(self, event: Failed) -> None:
        """Fail every request admitted and not finished (shutdown)."""
        with self.guard:
            seqs, self.seqs = self.seqs, []
        for s in seqs:
            s.out.fail(event)
        self.kv = packed.KvSlots(self.e.max_batch)

    def admit(self) -> None:
        tokens = sum(s.budget for s in self.seqs)

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
            if not request.row.prompt_ids:  # (the app refuses it first)
                request.send(failure(ConfigError("a prompt is empty; give at least one token")))
                continue
            seq = _Seq(request, _Output(request, self.e.tokenizer, self.e.metrics))
            seq.generator.manual_seed(_seed(request.row.sampling.seed))
            seq.ready = request.row.adapter is None
            if request.json_mode:
                seq.json = JsonRow(self.text_of, self.e.eos)
            tokens += seq.budget
            with self.guard:
                self.seqs.append(seq)

    def step(self) -> bool:
        """One turn under the model lock; whether a forward ran."""
        self.resolve()
        for s in list(self.seqs):
            if s.request.cancelled.is_set():
                self.finish(s, "cancelled")
        work = self.plan()
        if work:
            self.run_step(work)
        if self.e.cache.draining - self.pinned():  # removed adapters no row uses any more
            self.unroute()
            self.e.cache.drain(self.pinned())
            self.adapters_changed()
        return bool(work)

    def adapters_changed(self) -> None:
        """Whether steps can mix adapters per token, after the model's adapters changed."""
        model = self.e.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        blocker = per_token_blocker(model)
        mixable = blocker is None and not isinstance(head, LoraLayer | ModulesToSave)
        if mixable != self.mixable:
            log.info(
                "steps %s mix adapters (%s)", "now" if mixable else "no longer", blocker or "output head"
            )
        self.mixable = mixable

    # adapters -------------------------------------------------------------------------------

    def resolve(self) -> None:
        """Give admitted requests their adapter's key, start loads, fail those that cannot load."""
        if self.left:
            self.loads = {n: s for n, s in self.loads.items() if s != "noroom"}
            self.left = False
        for seq in [s for s in self.seqs if not s.ready]:
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

    # forwards -------------------------------------------------------------------------------

    def plan(self) -> list[tuple[_Seq, list[int]]]:
        """This step's work: one token for every decoding row, then chunks of the prompts waiting
        to be prefilled, in admission order, up to `prefill_chunk` prompt tokens in all. A prompt
        whose step failed runs alone. Without per-token routing (`mixable`), one adapter's rows
        per step, the adapters taking turns."""
        alone = [s for s in self.seqs if s.alone and s.ready and not s.history]
        if alone:
            s = alone[0]
            return [(s, s.prompt[s.done : s.done + self.e.prefill_chunk])]
        work = [(s, s.history[-1:]) for s in self.seqs if s.history]
        budget = self.e.prefill_chunk
        for s in self.seqs:
            if budget and s.ready and not s.history:
                chunk = s.prompt[s.done : s.done + budget]
                work.append((s, chunk))
                budget -= len(chunk)
        if work and not self.mixable:
            keys = list(dict.fromkeys(s.key for s, _ in work))
            key = keys[self.e.batches % len(keys)]
            work = [w for w in work if w[0].key == key]
        work.sort(key=lambda w: (w[0].key is not None, w[0].key or ""))  # an adapter's tokens adjacent
        return work

    def run_step(self, work: list[tuple[_Seq, list[int]]]) -> None:
        """One packed forward over `work` (see `lorakit.serve.packed`); the rows whose last token
        it computed (decoding rows, and prompts it completed) each get their next token."""
        ids: list[int] = []
        keys: list[str | None] = []
        parts, sampled, last = [], [], []
        for s, tokens in work:
            if s.slot is None:
                s.slot = self.kv.take()
            parts.append(packed.Part(s.slot, len(ids), len(tokens), s.done))
            ids += tokens
            keys += [s.key] * len(tokens)
            if s.history or s.done + len(tokens) == len(s.prompt):
                sampled.append(s)
                last.append(len(ids) - 1)
        self.e.batches += 1
        self.e.max_rows_seen = max(self.e.max_rows_seen, len(work))
        try:
            self.route(keys)
            pack = packed.Pack(self.kv, parts, self.device)
            out = self.e.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=pack.position[None],
                use_cache=False,
                logits_to_keep=torch.tensor(last, dtype=torch.long, device=self.device),
                **{packed.PACK: pack},
            )
        except Exception as e:  # noqa: BLE001 - only the requests at fault may fail
            self.step_failed(work, e)
            return
        for s, tokens in work:
            s.done += len(tokens)
        if sampled:
            self.emit(sampled, out.logits[0])

    def step_failed(self, work: list[tuple[_Seq, list[int]]], error: Exception) -> None:
        """A step that fed new prompts is run again without them and each prompt then runs alone,
        so only the request at fault gets the error; rows already decoding (they have streamed
        text) fail with it."""
        if not isinstance(error, LorakitError):
            log.exception("step failed", exc_info=error)
        prompts = [s for s, _ in work if not s.history]
        if prompts and len(work) > 1:
            for s in prompts:
                s.alone = True
            return
        for s, _ in work:
            self.finish(s, fail=failure(error))

    def route(self, keys: list[str | None]) -> None:
        """Route the packed sequence's tokens to adapter `keys` (kept while they stay the same)."""
        if tuple(keys) != self.routed:
            self.unroute()
            self.route_stack.enter_context(adapters_for_rows(self.e.model, keys, tokens=True))
            self.routed = tuple(keys)

    def unroute(self) -> None:
        self.route_stack.close()
        self.routed = None

    def emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample each row's next token and hand it on; rows that end leave."""
        logits = logits.float()
        top = max((s.request.logprobs for s in seqs if s.request.logprobs is not None), default=None)
        logp = torch.log_softmax(logits, -1) if top is not None else None
        samplings = [s.request.row.sampling for s in seqs]
        tokens = choose_tokens(logits, samplings, [s.generator for s in seqs], [s.history for s in seqs])
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
        self.e.metrics.step(len(seqs))

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
        """End `seq`: done as `reason`, or failed with `fail`; it leaves, with its keys and values."""
        if fail is not None:
            seq.out.fail(fail)
        else:
            self.e.cancelled += seq.out.finish(reason) == "cancelled"
        self.left = True
        with self.guard:
            if seq in self.seqs:
                self.seqs.remove(seq)
        if seq.slot is not None:
            self.kv.give(seq.slot)
            seq.slot = None
