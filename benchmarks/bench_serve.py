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
of the workload at once straight to the engine and reports each batching's tokens/s (`saturated`);
those engine-level measurements live in `bench_serve_steps.py`.

    PYTHONPATH=. python benchmarks/bench_serve.py [--rates 0.3 1.0] [--requests 6] [--budget-s 240]
        [--max-tokens 8 16] [--backends continuous static llama.cpp] [--routing-rounds 5]

Writes benchmarks/results/serve.json. The client runs in a process of its own (`Client`), as a
server's clients do: in the server's process its asyncio loop took Python's lock from the engine
thread and the server's loop (until 2026-12-08; results before then were measured that way). On a
machine with few cores it still competes for them, alike for every configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
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
from lorakit.serve import AdapterCache, Engine, create_app

sys.path.insert(0, str(Path(__file__).parent))
import bench_serve_llama  # noqa: E402
from bench_inference import PROMPTS, make_adapters  # noqa: E402 - the same adapters and prompts
from bench_serve_steps import packed_steps, routing_steps, saturated, spread_steps  # noqa: E402


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


class Client:
    """The load generator in a process of its own: `run` is `drive` there."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no copy of the server's threads and model
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx)
        self.pool.submit(time.sleep, 0).result()  # started (and its imports done) before any timing

    def run(self, url: str, reqs: list[dict], budget_s: float) -> tuple[list[dict], float, float]:
        return self.pool.submit(_drive, url, reqs, budget_s).result()

    def close(self) -> None:
        self.pool.shutdown()


def _drive(url: str, reqs: list[dict], budget_s: float) -> tuple[list[dict], float, float]:
    return asyncio.run(drive(url, reqs, budget_s))


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
    client = None if args.routing_only else Client()
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
                    records, wall, end = client.run(server.url, reqs, args.budget_s)
                finally:
                    server.stop()
                row = {"rate": rate, "adapters": spread, "batching": batching}
                row.update(summarize(records, wall, len(reqs), end))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if client is not None:
        client.close()
    out["at_same_p99"] = {m: at_same_p99(rows, m) for m in ("ttft_p99_s", "latency_p99_s")}
    print(json.dumps(out["at_same_p99"]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
