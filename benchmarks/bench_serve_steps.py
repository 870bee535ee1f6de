"""The serving benchmark's engine-level measurements (no HTTP), used by `bench_serve.py`'s flags.

`routing_steps` (`--routing-rounds`): a decode step right after the rows' adapter routing changed
against a plain one; `spread_steps` (`--spread-rounds`): a decode step of 1-8 rows on the base
model, all on one adapter, and each on its own; `packed_steps` (`--packed-rounds`): continuous
batching's step with a new prompt's chunk riding along against the decode step and the chunk apart;
`saturated` (`--saturated`): every request of a workload submitted at once straight to the engine,
each batching's tokens/s.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import torch

from lorakit.generate import Row, Sampling, adapters_for_rows, prompt_ids
from lorakit.layers import LoraLinear
from lorakit.mixed import adapter_rows
from lorakit.serve import Engine, packed
from lorakit.serve.engine import Done, Request, Text


@torch.no_grad()
def routing_steps(model, names: list[str], rounds: int, prompt_len: int = 48) -> dict:
    """Seconds of one decode step of `len(names)` rows (one adapter each), in interleaved rounds:
    a plain step (routing unchanged), the step right after a routing change (the rows' adapters
    permuted), and the same with every layer's stacks dropped first: what each routing change
    cost before the stacks were kept by adapter weights (all adapters in use, so the rebuild
    stacks exactly what the old per-routing cache stacked)."""
    model.eval()
    rng = random.Random(1)
    ids = torch.randint(0, 1000, (len(names), prompt_len), generator=torch.Generator().manual_seed(1))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    times: dict[str, list[float]] = {"plain": [], "after_change": [], "after_change_rebuilt": []}

    def step(rows, state):
        with adapter_rows(model, rows):
            t = time.perf_counter()
            out = model(input_ids=state["next"], past_key_values=state["cache"], use_cache=True)
            dt = time.perf_counter() - t
        state.update(cache=out.past_key_values, next=out.logits[:, -1:].argmax(-1))
        return dt

    for _ in range(rounds):
        rows = list(names)
        with adapter_rows(model, rows):
            out = model(input_ids=ids, use_cache=True)
            state = {"cache": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}
            for _ in range(2):  # the routing stays: plain decode steps (the second one timed)
                t = time.perf_counter()
                out = model(input_ids=state["next"], past_key_values=state["cache"], use_cache=True)
                dt = time.perf_counter() - t
                state.update(cache=out.past_key_values, next=out.logits[:, -1:].argmax(-1))
        times["plain"].append(dt)
        rng.shuffle(rows)
        times["after_change"].append(step(list(rows), state))
        rng.shuffle(rows)
        for layer in layers:
            layer._stacks = None
        times["after_change_rebuilt"].append(step(list(rows), state))

    def spread(v):
        v = sorted(v)
        return {"min": v[0], "median": v[len(v) // 2], "max": v[-1]}

    ratios = {
        k: spread([a / b for a, b in zip(times[k], times["plain"])])
        for k in ("after_change", "after_change_rebuilt")
    }
    return {"rows": len(names), "prompt_len": prompt_len, "seconds": times, "ratio_to_plain": ratios}


def spread_steps(model, keys: list[str], rounds: int, prompt_len: int = 48) -> dict:
    """Median seconds of one decode step for 1, 2, 4 and 8 rows: the base model (no adapter), every
    row on one adapter, and each row on its own adapter (a mixed batch); `rounds` rounds of 5
    steps each, the three kinds interleaved."""
    model.eval()
    ids = torch.randint(
        0,
        min(1000, model.config.vocab_size),
        (len(keys), prompt_len),
        generator=torch.Generator().manual_seed(1),
    )

    def step_s(row_keys: list[str | None]) -> float:
        with torch.no_grad(), adapters_for_rows(model, row_keys):
            out = model(input_ids=ids[: len(row_keys)], use_cache=True)
            times = []
            for _ in range(6):  # the first step is not timed
                t = time.perf_counter()
                out = model(
                    input_ids=out.logits[:, -1:].argmax(-1),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    kinds = {
        "base": lambda n: [None] * n,
        "one adapter": lambda n: keys[:1] * n,
        "own adapter": lambda n: keys[:n],
    }
    out: dict = {}
    for rows in [n for n in (1, 2, 4, 8) if n <= len(keys)]:
        seconds = {k: [] for k in kinds}
        for _ in range(rounds):
            for kind, row_keys in kinds.items():
                seconds[kind].append(step_s(row_keys(rows)))
        out[str(rows)] = {k: statistics.median(v) for k, v in seconds.items()}
        out[str(rows)]["own / one"] = out[str(rows)]["own adapter"] / out[str(rows)]["one adapter"]
    return out


def packed_steps(model, keys: list[str], rounds: int, chunks=(16, 64, 256), past: int = 48) -> dict:
    """Median seconds of continuous batching's step (`lorakit.serve.packed`) with 8 decoding rows,
    one per adapter, and a new prompt's chunk of `c` tokens: in one packed forward (what the
    scheduler runs) against the decode step and the chunk as two forwards (what it ran before
    prompts rode along), and against the same packed forward with every token on one adapter;
    `rounds` rounds, the kinds interleaved. Each time includes routing the tokens to their
    adapters, as the scheduler does whenever its rows change."""
    model.eval()
    packed.use_packed(model)
    rows = len(keys)
    kv = packed.KvSlots(rows + 1)
    g = torch.Generator().manual_seed(2)
    vocab = min(1000, model.config.vocab_size)

    def forward(parts: list, ids: list[int], names: list) -> float:
        keep = torch.tensor([p.start + p.length - 1 for p in parts])
        t = time.perf_counter()
        with torch.no_grad(), adapters_for_rows(model, names, tokens=True):
            pack = packed.Pack(kv, parts)
            model(
                input_ids=torch.tensor([ids]),
                position_ids=pack.position[None],
                use_cache=False,
                logits_to_keep=keep,
                **{packed.PACK: pack},
            )
            return time.perf_counter() - t

    for i, key in enumerate(keys):  # each row's past
        forward(
            [packed.Part(i, 0, past, 0)], torch.randint(0, vocab, (past,), generator=g).tolist(), [key] * past
        )
    decode = [packed.Part(i, i, 1, past) for i in range(rows)]
    out: dict = {}
    for c in chunks:
        prompt = torch.randint(0, vocab, (c,), generator=g).tolist()
        # the prompt on the first row's adapter, right after it (the scheduler orders tokens by adapter)
        parts = [decode[0], packed.Part(rows, 1, c, 0)] + [
            packed.Part(i, i + c, 1, past) for i in range(1, rows)
        ]
        ids = [5] + prompt + [5] * (rows - 1)
        names = [keys[0]] * (1 + c) + list(keys[1:])
        kinds = (
            "one forward",
            "decode step",
            "prompt forward",
            "one forward, one adapter",
            "decode step, one adapter",
        )
        seconds: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(rounds):
            seconds["one forward"].append(forward(parts, ids, names))
            seconds["decode step"].append(forward(decode, [5] * rows, list(keys)))
            seconds["prompt forward"].append(forward([packed.Part(rows, 0, c, 0)], prompt, [keys[0]] * c))
            seconds["one forward, one adapter"].append(forward(parts, ids, [keys[0]] * len(ids)))
            seconds["decode step, one adapter"].append(forward(decode, [5] * rows, [keys[0]] * rows))
        med = {k: statistics.median(v) for k, v in seconds.items()}
        med["one / two"] = med["one forward"] / (med["decode step"] + med["prompt forward"])
        med["8 adapters / 1"] = med["one forward"] / med["one forward, one adapter"]
        med["decode step, 8 adapters / 1"] = med["decode step"] / med["decode step, one adapter"]
        out[str(c)] = med
    return out


def saturated(model, tok, cache, reqs: list[dict], batchings: list[str], rounds: int, max_batch: int) -> dict:
    """Tokens per second of each batching with every request of `reqs` submitted at once straight
    to the engine (no HTTP, no arrival times: always more waiting than `max_batch`), `rounds`
    interleaved rounds: per second of wall time, and per second of the process's CPU time (with
    one torch thread the engine thread does the work; the two differ when something else takes
    the cores)."""

    async def run(engine: Engine) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        engine.start()
        try:
            jobs = [
                Request(Row(prompt_ids(tok, r["prompt"]), r["model"], Sampling(r["max_tokens"])), loop)
                for r in reqs
            ]
            start, cpu = time.perf_counter(), time.process_time()
            for job in jobs:
                engine.submit(job)
            tokens = 0
            for job in jobs:
                event = await job.events.get()
                while isinstance(event, Text):
                    event = await job.events.get()
                if not isinstance(event, Done):
                    raise RuntimeError(f"a request failed: {event}")
                tokens += event.completion_tokens
            return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)
        finally:
            engine.stop()

    out: dict[str, dict[str, list[float]]] = {
        b: {"tokens_per_s": [], "tokens_per_cpu_s": []} for b in batchings
    }
    for _ in range(rounds):
        for b in batchings:
            engine = Engine(model, tok, cache, max_batch=max_batch, max_queue=len(reqs), batching=b)
            wall, cpu = asyncio.run(run(engine))
            out[b]["tokens_per_s"].append(wall)
            out[b]["tokens_per_cpu_s"].append(cpu)
    for v in out.values():
        v["median"], v["median_cpu"] = (
            statistics.median(v["tokens_per_s"]),
            statistics.median(v["tokens_per_cpu_s"]),
        )
    return out
