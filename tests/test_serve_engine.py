"""lorakit.serve.engine: the batcher behind the server, through HTTP and directly.

Stop strings, a broken adapter failing only its own requests, one request's error never reaching
the requests batched with it, a bounded load test, a full queue answering 503, and a
disconnecting client cancelling its generation.
"""

import asyncio
import concurrent.futures
import time

import httpx
import pytest
import torch
from fixtures import SERVE_KEY as KEY
from fixtures import Server, expected, make_embedding_adapter, serve_app

import lorakit
import lorakit.hf
from lorakit.generate import Row, Sampling, generate_text, prompt_ids
from lorakit.serve import AdapterCache, Engine
from lorakit.serve.engine import Done, Failed, Text
from lorakit.serve.engine import Request as Job
from lorakit.serve.waiting import Overloaded

openai = pytest.importorskip("openai")


def test_stop_strings(env):
    full = expected(env, "Abc", "a1", 20, chat=False)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    want = full[: full.index(stop)]
    for stream in (False, True):
        got = env["client"].completions.create(
            model="a1", prompt="Abc", max_tokens=20, temperature=0, stop=[stop], stream=stream
        )
        text = "".join(c.choices[0].text for c in got) if stream else got.choices[0].text
        assert text == want


def test_broken_adapter_fails_alone_and_token_ids(env):
    client = env["client"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # likely in one batch: only one fails
        bad = pool.submit(client.completions.create, model="broken", prompt="x", max_tokens=3)
        good = pool.submit(client.completions.create, model="a1", prompt="Fine", max_tokens=5, temperature=0)
        with pytest.raises(openai.InternalServerError, match="could not be loaded"):
            bad.result()
        assert good.result().choices[0].text == expected(env, "Fine", "a1", 5, chat=False)
    ids = env["tok"]("Token ids")["input_ids"]
    got = client.completions.create(model="a2", prompt=ids, max_tokens=5, temperature=0)
    assert got.choices[0].text == expected(env, "Token ids", "a2", 5, chat=False)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="a2", prompt=[10**7], max_tokens=5)


@pytest.mark.slow
def test_load_8_clients_200_requests_4_adapters(env):
    client = env["client"]
    prompts = ["One", "Two words", "A third prompt here", "Four"]
    names = ["a1", "a2", "a3", "a4"]
    want = {(n, p): expected(env, p, n, 6, chat=False) for n in names for p in prompts}
    jobs = [(names[i % 4], prompts[(i // 4) % 4]) for i in range(200)]

    def one(job):
        name, prompt = job
        return (
            client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs, timeout=600))
    wrong = [(job, got) for job, got in zip(jobs, results) if got != want[job]]
    assert not wrong, wrong[:3]
    assert env["app"].state.engine.max_rows_seen > 1  # concurrent requests were batched together


def test_full_queue_answers_503_and_disconnect_cancels(env):
    app = serve_app(env["folder"], {"a1": env["paths"]["a1"]}, "--max-queue", "1", "--max-batch", "1")
    server = Server(app)
    try:
        engine = app.state.engine
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "a1", "prompt": "Busy", "max_tokens": 3, "temperature": 0}
        with engine.lock:  # the worker blocks on its first batch; one more request fills the queue
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futures = [
                    pool.submit(
                        httpx.post, server.url + "/v1/completions", json=body, headers=auth, timeout=60
                    )
                ]
                time.sleep(0.5)
                futures.append(
                    pool.submit(
                        httpx.post, server.url + "/v1/completions", json=body, headers=auth, timeout=60
                    )
                )
                time.sleep(0.5)
                busy = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60)
                assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_error"
                assert busy.headers["retry-after"] == "1"
                engine.lock.release()
                try:
                    assert all(f.result().status_code == 200 for f in futures)
                finally:
                    engine.lock.acquire()
        # a streaming client that hangs up mid-generation cancels it
        long = {**body, "max_tokens": 500, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=long, headers=auth, timeout=60) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 30
        while engine.cancelled == 0:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.05)
    finally:
        server.stop()


def run_jobs(engine: Engine, rows: list[Row]) -> list[list]:
    """Queue `rows` before the worker starts (so they form one batch), run, return their events."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(row, loop) for row in rows]
        for job in jobs:
            engine.submit(job)
        engine.start()
        try:
            out = []
            for job in jobs:
                events = [await asyncio.wait_for(job.events.get(), 120)]
                while isinstance(events[-1], Text):
                    events.append(await asyncio.wait_for(job.events.get(), 120))
                out.append(events)
            return out
        finally:
            engine.stop()

    return asyncio.run(main())


def text_of(events: list) -> str:
    assert isinstance(events[-1], Done), events[-1]
    return "".join(e.piece for e in events[:-1])


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_one_bad_request_never_fails_its_batch(env, tmp_path, batching):
    emb = make_embedding_adapter(env["folder"], tmp_path / "emb", 5)
    lorakit.load_adapter(env["ref"], emb, f"emb_{batching}")
    model, tok = lorakit.hf.load_model(env["folder"])
    cache = AdapterCache(model, {"a1": env["paths"]["a1"], "emb": emb})
    engine = Engine(model, tok, cache, max_batch=8, wait_ms=500, batching=batching)
    ids = prompt_ids(tok, "Fine", chat=False)
    rows = [
        Row(ids, "a1", Sampling(5)),
        Row([10**7], None, Sampling(5)),  # past the vocabulary (the app refuses it; the engine must cope)
        Row(ids, "emb", Sampling(5)),  # an embedding adapter in a batch with a linear one
        Row(ids, None, Sampling(5)),
    ]
    good, bad, embedding, base = run_jobs(engine, rows)
    if batching == "static":
        assert engine.batches == 1 + 4  # the batch failed (the bad row), then each row ran alone
        assert engine.max_rows_seen == 4  # all four were batched together
    assert isinstance(bad[-1], Failed) and bad[-1].status == 500 and "IndexError" in bad[-1].message
    assert text_of(good) == expected(env, "Fine", "a1", 5, chat=False)
    assert text_of(embedding) == expected(env, "Fine", f"emb_{batching}", 5, chat=False)
    assert text_of(base) == expected(env, "Fine", None, 5, chat=False)


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_embedding_and_linear_adapters_share_a_batch(env, tmp_path, batching):
    model, tok = lorakit.hf.load_model(env["folder"])
    emb = make_embedding_adapter(env["folder"], tmp_path / "emb", 5)
    cache = AdapterCache(model, {"a1": env["paths"]["a1"], "emb": emb})
    engine = Engine(model, tok, cache, wait_ms=500, batching=batching)
    ids = prompt_ids(tok, "Fine", chat=False)
    events = run_jobs(engine, [Row(ids, "a1", Sampling(5)), Row(ids, "emb", Sampling(5))])
    assert engine.max_rows_seen == 2  # one mixed batch (static) or shared decode steps (continuous)
    if batching == "static":
        assert engine.batches == 1  # nothing rerun
    assert [text_of(e) for e in events] == [expected(env, "Fine", "a1", 5, chat=False), text_of(events[1])]
    ref, _ = lorakit.hf.load_model(env["folder"])
    lorakit.load_adapter(ref, emb, "emb")
    assert text_of(events[1]) == generate_text(ref, tok, "Fine", "emb", Sampling(5), chat=False)


def test_embedding_adapter_served_beside_others(env, tmp_path):
    emb = make_embedding_adapter(env["folder"], tmp_path / "emb", 6)
    lorakit.load_adapter(env["ref"], emb, "emb6")
    server = Server(
        serve_app(env["folder"], {"emb": emb, "a2": env["paths"]["a2"]}, "--batch-wait-ms", "300")
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {
                name: pool.submit(
                    client.completions.create, model=name, prompt="Both", max_tokens=5, temperature=0
                )
                for name in ("emb", "a2")
            }
            got = {name: f.result().choices[0].text for name, f in futures.items()}
        assert got == {
            "emb": expected(env, "Both", "emb6", 5, chat=False),
            "a2": expected(env, "Both", "a2", 5, chat=False),
        }
    finally:
        server.stop()


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_modules_to_save_adapter_beside_another_both_answer(env, tmp_path, batching):
    """A modules_to_save adapter batched with another: each copy serves its own rows (as in PEFT), so
    both requests answer from one batch, each as it would alone."""
    model, tok = lorakit.hf.load_model(env["folder"])
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["norm"]))
    with torch.no_grad():
        for p in lorakit.io.adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.5)
    lorakit.save_adapter(model, tmp_path / "mts")
    model, _ = lorakit.hf.load_model(env["folder"])
    engine = Engine(
        model,
        tok,
        AdapterCache(model, {"a1": env["paths"]["a1"], "mts": tmp_path / "mts"}),
        wait_ms=500,
        batching=batching,
    )
    ids = prompt_ids(tok, "Fine", chat=False)
    a1, mts = run_jobs(engine, [Row(ids, "a1", Sampling(5)), Row(ids, "mts", Sampling(5))])
    assert engine.max_rows_seen == 2
    ref, _ = lorakit.hf.load_model(env["folder"])
    lorakit.load_adapter(ref, tmp_path / "mts", "mts")
    assert text_of(a1) == expected(env, "Fine", "a1", 5, chat=False)
    assert text_of(mts) == generate_text(ref, tok, "Fine", "mts", Sampling(5), chat=False)


def test_stop_lets_short_requests_finish_and_cancels_the_rest(env):
    model, tok = lorakit.hf.load_model(env["folder"])
    engine = Engine(model, tok, AdapterCache(model), max_batch=4)
    ids = prompt_ids(tok, "Fine", chat=False)

    async def main():
        loop = asyncio.get_running_loop()
        engine.start()
        long, short = Job(Row(ids, None, Sampling(500)), loop), Job(Row(ids, None, Sampling(3)), loop)
        engine.submit(long)
        first = await asyncio.wait_for(long.events.get(), 60)  # it runs
        engine.submit(short)
        start = time.monotonic()
        await asyncio.to_thread(engine.stop, 0.5)
        assert time.monotonic() - start < 15
        with pytest.raises(Overloaded) as e:
            engine.submit(Job(Row(ids, None, Sampling(3)), loop))
        assert e.value.status == 503
        out = []
        for job in (long, short):
            events = [first] if job is long else []
            while not events or isinstance(events[-1], Text):
                events.append(await asyncio.wait_for(job.events.get(), 10))
            out.append(events)
        return out

    long, short = asyncio.run(main())
    assert isinstance(short[-1], Done)  # finished within the deadline
    assert isinstance(long[-1], Failed) and long[-1].status == 503 and "shut down" in long[-1].message
