"""A bounded soak of the continuous-batching server (marked slow): many clients on random adapters,
streaming clients that hang up early, and an adapter loaded and unloaded (vLLM's endpoints) while
requests run. Every finished greedy reply equals the same request served alone (so no request
got another's adapter or tokens), /health keeps answering, and afterwards nothing is left over:
no rows in flight, no adapter on the model that the cache does not list.
"""

import concurrent.futures
import random
import shutil
import threading
import time

import httpx
import pytest
from fixtures import SERVE_KEY, Server, expected, serve_app

import lorakit

AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}
PROMPTS = ["One", "Two words", "A third, longer prompt with more words in it", "Four"]


@pytest.mark.slow
def test_soak_random_clients_disconnects_and_adapter_churn(env):
    allowed = env["dir"] / "allowed"
    shutil.copytree(env["paths"]["a1"], allowed / "churn", dirs_exist_ok=True)
    app = serve_app(
        env["folder"],
        {"a1": env["paths"]["a1"], "a2": env["paths"]["a2"]},
        "--adapter-dir",
        str(allowed),
        "--max-loaded",
        "3",
        "--max-batch",
        "6",
        "--prefill-chunk",
        "8",
    )
    server = Server(app)
    names = ["a1", "a2", "a3", "a4", None]
    as_ref = {"churn": "a1"}  # the copy of a1 answers as a1
    want = {
        (n, p, k): expected(env, p, as_ref.get(n, n), k, chat=False)
        for n in [*names, "churn"]
        for p in PROMPTS
        for k in (3, 9)
    }
    stop = threading.Event()
    problems: list = []

    def client(seed: int) -> int:
        rng, done = random.Random(seed), 0
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            while not stop.is_set():
                name, prompt, k = rng.choice([*names, "churn"]), rng.choice(PROMPTS), rng.choice((3, 9))
                body = {"model": name or "model", "prompt": prompt, "max_tokens": k, "temperature": 0}
                if rng.random() < 0.25:  # a streaming client that hangs up after the first piece
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        next(r.iter_lines(), None)
                    continue
                r = http.post("/v1/completions", json=body)
                if r.status_code == 404 and name == "churn":
                    continue  # unloaded at that moment
                if r.status_code != 200 or r.json()["choices"][0]["text"] != want[name, prompt, k]:
                    problems.append((name, prompt, k, r.status_code, r.text[:200]))
                done += 1
        return done

    def churn() -> int:
        rounds = 0
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            while not stop.is_set():
                r = http.post("/v1/load_lora_adapter", json={"lora_name": "churn", "lora_path": "churn"})
                # 400: still loaded from the last round; 503: every cache slot in use by running rows
                if r.status_code not in (200, 400, 503):
                    problems.append(("load", r.status_code, r.text[:200]))
                time.sleep(0.3)
                r = http.post("/v1/unload_lora_adapter", json={"lora_name": "churn"})
                if r.status_code not in (200, 404):
                    problems.append(("unload", r.status_code, r.text[:200]))
                rounds += 1
                time.sleep(0.2)
        return rounds

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client, seed) for seed in range(6)]
            churner = pool.submit(churn)
            end = time.monotonic() + 15
            while time.monotonic() < end:
                assert httpx.get(server.url + "/health", timeout=10).status_code == 200
                time.sleep(0.5)
            stop.set()
            answered = sum(f.result() for f in clients)
            assert churner.result() >= 3
        assert not problems, problems[:3]
        assert answered >= 20
        engine = app.state.engine
        deadline = time.monotonic() + 30
        while engine.in_flight():
            assert time.monotonic() < deadline, "requests left in flight"
            time.sleep(0.1)
        keys = {engine.cache.key(n) for n in engine.cache.loaded_names()}
        assert not engine.cache.draining  # removed adapters left the model once their rows ended
        assert set(lorakit.list_adapters(engine.model)) == keys
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        stop.set()
        server.stop()
