"""Serving benchmark: `lorakit serve` under Poisson load on loopback, side by side in one run.

SmolLM2-135M-Instruct with 8 random-but-fixed adapters (r=16 on all 7 linear projections). For each
arrival rate, and for requests all on one adapter or spread over the 8, the same request stream
(prompts, output lengths, adapters and arrival times drawn from `--seed`) is sent to the server
with continuous batching and with static batching (`--batching static`), in interleaved order.
Each request streams (`/v1/chat/completions`, greedy); the client records time to first token (TTFT)
and the time per output token after the first (TPOT). A run is bounded in count (`--requests` per
configuration) and time (`--budget-s` per configuration: requests not finished by then are
cancelled and counted as unfinished). `--backends llama.cpp` adds llama.cpp on the same stream
(`bench_serve_llama.py`); `--routing-rounds` times a decode step right after the rows' adapter
routing changed against a plain one (`routing_steps`); `--spread-rounds` times a decode step of
1-8 rows on the base model, all on one adapter, and each on its own (`spread_steps`);
`--packed-rounds` times continuous batching's step with a new prompt's chunk riding along against
the decode step and the chunk apart (`packed_steps`); `--saturated N ROUNDS` submits N requests
of the workload at once straight to the engine and reports each batching's tokens/s (`saturated`).

    PYTHONPATH=. python benchmarks/bench_serve.py [--rates 0.3 1.0] [--requests 6] [--budget-s 240]
        [--max-tokens 8 16] [--backends continuous static llama.cpp] [--routing-rounds 5]

Writes benchmarks/results/serve.json. The client runs in the server's process (one asyncio loop,
the server in a thread): on a machine with few cores it competes for them, alike for every
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

import lorakit.hf
from lorakit.generate import adapters_for_rows
from lorakit.layers import LoraLinear
from lorakit.mixed import adapter_rows
from lorakit.serve import AdapterCache, Engine, create_app

sys.path.insert(0, str(Path(__file__).parent))
import bench_serve_llama  # noqa: E402
from bench_inference import PROMPTS, make_adapters  # noqa: E402 - the same adapters and prompts


class Server:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def workload(
    seed: int, rate: float, n: int, adapters: list[str], max_tokens: tuple[int, int] = (8, 16)
) -> list[dict]:
    """`n` requests: Poisson arrival times at `rate` per second, prompt, max_tokens (uniform in
    the closed range `max_tokens`), adapter."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(
            {
                "at": t,
                "prompt": " ".join(rng.sample(PROMPTS, rng.randint(1, 3))),
                "max_tokens": rng.randint(*max_tokens),
                "model": rng.choice(adapters),
            }
        )
    return out


async def one(client: httpx.AsyncClient, url: str, req: dict, start: float, record: dict) -> None:
    """Send `req` at its arrival time; `record` fills in as its reply streams (so a request cut
    off by the time budget still counts the tokens it got)."""
    await asyncio.sleep(max(0.0, start + req["at"] - time.monotonic()))
    body = {"model": req["model"], "max_tokens": req["max_tokens"]}
    body["messages"] = [{"role": "user", "content": req["prompt"]}]
    body.update(temperature=0, stream=True, stream_options={"include_usage": True})
    record.update(sent=time.monotonic(), stamps=[], tokens=0, done=False)
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                record.update(tokens=data["usage"]["completion_tokens"], done=r.status_code == 200)
            elif data["choices"][0]["delta"]["content"]:
                record["stamps"].append(time.monotonic())


async def drive(url: str, reqs: list[dict], budget_s: float) -> tuple[list[dict], float, float]:
    """Run the workload for at most `budget_s` seconds; the records, the seconds it took, and
    the time of the cut."""
    records: list[dict] = [{} for _ in reqs]
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=256)) as client:
        start = time.monotonic()
        tasks = [asyncio.create_task(one(client, url, r, start, rec)) for r, rec in zip(reqs, records)]
        _, pending = await asyncio.wait(tasks, timeout=budget_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return [r for r in records if r], time.monotonic() - start, start + budget_s


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(records: list[dict], wall: float, sent: int, end: float) -> dict:
    """Tokens/s over the run (a cut-off request counts its streamed pieces); TTFT percentiles over
    the requests sent (one that got no token before the cut at `end` counts `end - sent`, a lower
    bound); TPOT and latency (sent to last token) percentiles over the finished requests."""
    done = [r for r in records if r["done"]]
    latency = [r["stamps"][-1] - r["sent"] for r in done if r["stamps"]]
    ttft = [(r["stamps"][0] if r["stamps"] else end) - r["sent"] for r in records]
    tpot = [(r["stamps"][-1] - r["stamps"][0]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1]
    tokens = sum(r["tokens"] if r["done"] else len(r["stamps"]) for r in records)
    return {
        "requests": sent,
        "finished": len(done),
        "no_first_token": sum(not r["stamps"] for r in records),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
        "tpot_p50_s": pct(tpot, 0.5),
        "tpot_p99_s": pct(tpot, 0.99),
        "latency_p50_s": pct(latency, 0.5),
        "latency_p99_s": pct(latency, 0.99),
    }


def at_same_p99(rows: list[dict], metric: str = "ttft_p99_s") -> list[dict]:
    """Throughput at the same p99 latency: for each p99 `metric` seen in the run (a latency
    target), each batching's best tokens/s over the arrival rates whose p99 stays within it, per
    adapter spread (None: no rate of that batching got there)."""
    out = []
    for spread in sorted({r["adapters"] for r in rows}):
        mine = [r for r in rows if r["adapters"] == spread and r.get(metric) is not None]
        for target in sorted({r[metric] for r in mine}):
            best = {
                b: max(
                    (r["tokens_per_s"] for r in mine if r["batching"] == b and r[metric] <= target),
                    default=None,
                )
                for b in ("continuous", "static")
            }
            c, s = best["continuous"], best["static"]
            out.append(
                {
                    "adapters": spread,
                    metric: target,
                    "continuous": c,
                    "static": s,
                    "ratio": c / s if c and s else None,
                }
            )
    return out


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
    prompts rode along); `rounds` rounds, the kinds interleaved."""
    from lorakit.serve import packed

    model.eval()
    packed.use_packed(model)
    rows = len(keys)
    kv = packed.KvSlots(rows + 1)
    g = torch.Generator().manual_seed(2)
    vocab = min(1000, model.config.vocab_size)

    def forward(parts: list, ids: list[int], names: list) -> float:
        positions = [i for p in parts for i in range(p.past, p.past + p.length)]
        keep = torch.tensor([p.start + p.length - 1 for p in parts])
        with torch.no_grad(), adapters_for_rows(model, names, tokens=True):
            t = time.perf_counter()
            model(
                input_ids=torch.tensor([ids]),
                position_ids=torch.tensor([positions]),
                use_cache=False,
                logits_to_keep=keep,
                **{packed.PACK: packed.Pack(kv, parts)},
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
        seconds: dict[str, list[float]] = {"one forward": [], "decode step": [], "prompt forward": []}
        for _ in range(rounds):
            seconds["one forward"].append(forward(parts, ids, names))
            seconds["decode step"].append(forward(decode, [5] * rows, list(keys)))
            seconds["prompt forward"].append(forward([packed.Part(rows, 0, c, 0)], prompt, [keys[0]] * c))
        med = {k: statistics.median(v) for k, v in seconds.items()}
        med["one / two"] = med["one forward"] / (med["decode step"] + med["prompt forward"])
        out[str(c)] = med
    return out


def saturated(model, tok, cache, reqs: list[dict], batchings: list[str], rounds: int, max_batch: int) -> dict:
    """Tokens per second of each batching with every request of `reqs` submitted at once straight
    to the engine (no HTTP, no arrival times: always more waiting than `max_batch`), `rounds`
    interleaved rounds: per second of wall time, and per second of the process's CPU time (with
    one torch thread the engine thread does the work: steadier on a shared machine)."""
    from lorakit.generate import Row, Sampling, prompt_ids
    from lorakit.serve.engine import Done, Request, Text

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 1.0], help="requests per second")
    parser.add_argument("--requests", type=int, default=6, help="requests per configuration")
    parser.add_argument("--budget-s", type=float, default=240.0, help="seconds per configuration")
    parser.add_argument("--spreads", type=int, nargs="+", default=[1, 8], help="adapters the requests use")
    parser.add_argument(
        "--max-tokens", type=int, nargs=2, default=[8, 16], metavar=("LO", "HI"), help="output length range"
    )
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    parser.add_argument("--routing-rounds", type=int, default=5, help="decode-step timing rounds (0: skip)")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=["continuous", "static", "llama.cpp"],
        default=["continuous", "static"],
        help="lorakit's two batchings and llama.cpp (needs llama-cpp-python; skipped with a message without)",
    )
    parser.add_argument("--llama-type", default="f32", help="the base GGUF's type for llama.cpp")
    parser.add_argument(
        "--gguf-dir", help="where the GGUF files are written once and reused (default: a temp dir)"
    )
    parser.add_argument("--routing-only", action="store_true", help="only the step timings")
    parser.add_argument(
        "--packed-rounds", type=int, default=0, help="a prompt chunk in the decode step vs apart (0: skip)"
    )
    parser.add_argument(
        "--saturated",
        type=int,
        nargs=2,
        default=[0, 0],
        metavar=("N", "ROUNDS"),
        help="N requests at once straight to the engine, per spread, ROUNDS rounds (0: skip)",
    )
    parser.add_argument(
        "--spread-rounds", type=int, default=0, help="decode steps of 1-8 rows on 1 vs own adapters (0: skip)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    model, tok = lorakit.hf.load_model("smollm2-135m")
    names = make_adapters(model, tmp, 8, 16)
    model, tok = lorakit.hf.load_model("smollm2-135m")  # a clean base; the cache loads the files
    cache = AdapterCache(model, {n: tmp for n in names}, capacity=8)
    cache.ensure(names)
    out: dict = {"args": vars(args)}
    if args.routing_rounds:
        out["routing"] = routing_steps(model, [cache.key(n) for n in names], args.routing_rounds)
        print(json.dumps(out["routing"]["ratio_to_plain"]), flush=True)
    if args.spread_rounds:
        out["spread_steps"] = spread_steps(model, [cache.key(n) for n in names], args.spread_rounds)
        print(json.dumps(out["spread_steps"]), flush=True)
    if args.packed_rounds:
        out["packed_steps"] = packed_steps(model, [cache.key(n) for n in names], args.packed_rounds)
        print(json.dumps(out["packed_steps"]), flush=True)
    backends = list(args.backends)
    llama = None
    if "llama.cpp" in backends:
        why = bench_serve_llama.missing()
        if why:
            print(f"skipping llama.cpp: {why}", flush=True)
            out["llama_cpp"] = f"skipped: {why}"
            backends.remove("llama.cpp")
        else:
            folder = Path(args.gguf_dir) if args.gguf_dir else tmp / "gguf"
            keys = {n: cache.key(n) for n in names}
            llama = bench_serve_llama.LlamaServer(
                *bench_serve_llama.export(model, keys, folder, args.llama_type), args.threads
            )
    if args.saturated[0]:
        n, rounds = args.saturated
        out["saturated"] = {}
        for spread in args.spreads:
            reqs = workload(args.seed, 1.0, n, names[:spread], tuple(args.max_tokens))
            lorakit_backends = [b for b in backends if b != "llama.cpp"]
            got = saturated(model, tok, cache, reqs, lorakit_backends, rounds, args.max_batch)
            if llama is not None:  # the same requests, all arrived at once, one after another
                at_once = [{**r, "at": 0.0} for r in reqs]
                speeds = [
                    summarize(*llama.run(at_once, 1e9)[:2], n, 1e18)["tokens_per_s"] for _ in range(rounds)
                ]
                got["llama.cpp"] = {"tokens_per_s": speeds, "median": statistics.median(speeds)}
            out["saturated"][str(spread)] = got
            print(json.dumps({"saturated": n, "adapters": spread, **got}), flush=True)
    rows = out["rows"] = []
    for rate in [] if args.routing_only else args.rates:
        for spread in args.spreads:
            reqs = workload(args.seed, rate, args.requests, names[:spread], tuple(args.max_tokens))
            for batching in backends:
                if batching == "llama.cpp":
                    records, wall, end = llama.run(reqs, args.budget_s)
                    rows.append({"rate": rate, "adapters": spread, "batching": batching})
                    rows[-1].update(summarize(records, wall, len(reqs), end))
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                engine = Engine(model, tok, cache, max_batch=args.max_batch, batching=batching)
                server = Server(create_app(engine, "base", shutdown_timeout=0))
                try:
                    records, wall, end = asyncio.run(drive(server.url, reqs, args.budget_s))
                finally:
                    server.stop()
                row = {"rate": rate, "adapters": spread, "batching": batching}
                row.update(summarize(records, wall, len(reqs), end))
                rows.append(row)
                print(json.dumps(row), flush=True)
    out["at_same_p99"] = {m: at_same_p99(rows, m) for m in ("ttft_p99_s", "latency_p99_s")}
    print(json.dumps(out["at_same_p99"]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
