"""`lorakit serve` end to end: a real uvicorn server on loopback, the real `openai` client.

Greedy outputs equal `lorakit generate` (same code path), per adapter; streaming, stop strings,
auth, limits, OpenAI-style errors, admin load/unload by name only, LRU eviction, a full queue
answering 503, a disconnecting client cancelling its generation, and a bounded load test.
"""

import concurrent.futures
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fixtures import make_adapter, tiny_chat_model

import lorakit
import lorakit.hf
from lorakit.cli import build_parser, main
from lorakit.commands.serve import build, parse_adapters
from lorakit.errors import ConfigError
from lorakit.generate import Sampling, generate_text

openai = pytest.importorskip("openai")
KEY = "test-key"
BASE = "model"  # the base model's id: its folder's name


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(folder, adapters: dict, *extra: str):
    argv = ["serve", "--model", str(folder), "--api-key", KEY, *extra]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    app, _ = build(build_parser("serve").parse_args(argv))
    return Server(app), app


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    folder = tiny_chat_model(d / BASE)
    paths = {f"a{i}": make_adapter(folder, d / f"a{i}", i, r=4 + i) for i in range(1, 5)}
    allowed = d / "allowed"
    allowed.mkdir()
    for name in ("a3", "a4"):  # a3 and a4 are found in --adapter-dir, loaded on first use
        shutil.copytree(paths[name], allowed / name)
    shutil.copytree(paths["a1"], allowed / "late")  # listed, loaded on first use or through the admin API
    (allowed / "broken").mkdir()  # a config, but a corrupt weights file
    shutil.copy(paths["a1"] / "adapter_config.json", allowed / "broken")
    (allowed / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    (d / "outside").mkdir()
    shutil.copytree(paths["a1"], d / "outside" / "evil")
    ref, tok = lorakit.hf.load_model(folder)
    for name, path in paths.items():
        lorakit.load_adapter(ref, path, name)
    server, app = serve(
        folder, {"a1": paths["a1"], "a2": paths["a2"]}, "--adapter-dir", str(allowed), "--max-loaded", "3"
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {
        "folder": folder,
        "paths": paths,
        "ref": ref,
        "tok": tok,
        "server": server,
        "client": client,
        "app": app,
        "dir": d,
    }
    server.stop()


def expected(env, prompt, adapter, max_tokens, chat):
    return generate_text(env["ref"], env["tok"], prompt, adapter, Sampling(max_tokens=max_tokens), chat=chat)


def test_models_lists_base_and_adapters(env):
    ids = [m.id for m in env["client"].models.list().data]
    assert ids[0] == BASE and set(ids[1:]) == {"a1", "a2", "a3", "a4", "late", "broken"}


def test_completions_equal_lorakit_generate(env, capsys):
    client = env["client"]
    for adapter in ("a1", "a2", None):
        got = client.completions.create(
            model=adapter or BASE, prompt="The weather", max_tokens=12, temperature=0
        )
        assert got.choices[0].text == expected(env, "The weather", adapter, 12, chat=False)
        assert got.usage.completion_tokens <= 12 and got.choices[0].finish_reason in ("length", "stop")
    assert (
        got.choices[0].text
        != client.completions.create(model="a1", prompt="The weather", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    # and literally `lorakit generate` (the CLI) for one adapter
    argv = [
        "generate",
        "--model",
        str(env["folder"]),
        "--adapter",
        f"a2={env['paths']['a2']}",
        "--raw",
        "--max-tokens",
        "12",
    ]
    assert main([*argv, "The weather"]) == 0
    cli_text = capsys.readouterr().out[:-1]
    assert (
        client.completions.create(model="a2", prompt="The weather", max_tokens=12, temperature=0)
        .choices[0]
        .text
        == cli_text
    )


def test_chat_and_streaming(env):
    client = env["client"]
    messages = [{"role": "user", "content": "Say hello"}]
    for adapter in ("a1", "a2"):
        want = expected(env, messages, adapter, 10, chat=True)
        got = client.chat.completions.create(model=adapter, messages=messages, max_tokens=10, temperature=0)
        assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(
            model=adapter, messages=messages, max_tokens=10, temperature=0, stream=True
        )
        chunks = list(stream)
        assert len(chunks) > 2 and "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    pieces = client.completions.create(
        model="a3", prompt="Stream me", max_tokens=9, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == expected(env, "Stream me", "a3", 9, chat=False)


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


def test_seeded_sampling_is_reproducible(env):
    kw = {"model": "a2", "prompt": "Dice", "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 11}
    a, b = (env["client"].completions.create(**kw).choices[0].text for _ in range(2))
    want = generate_text(env["ref"], env["tok"], "Dice", "a2", Sampling(8, 0.9, 0.95, 11), chat=False)
    assert a == b == want


def test_auth(env):
    bad = openai.OpenAI(base_url=env["server"].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(env["server"].url + "/v1/models").status_code == 401
    assert httpx.get(env["server"].url + "/health").json()["status"] == "ok"  # no key needed


def test_bad_requests_get_openai_errors(env):
    client, url = env["client"], env["server"].url
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a1", prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a1", prompt="word " * 5000, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model="a1", prompt="x", max_tokens=2, n=2)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(url + "/v1/completions", content=b"x" * 1_100_000, headers=auth)
    assert r.status_code == 413
    assert httpx.get(url + "/v1/nothing", headers=auth).json()["error"]["message"]


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


def test_admin_loads_by_name_only(env):
    url, auth = env["server"].url, {"Authorization": f"Bearer {KEY}"}
    for bad in ("../outside/evil", "a/b", "..", ".hidden", "x" * 200):
        r = httpx.post(url + "/admin/adapters", json={"name": bad}, headers=auth)
        assert r.status_code == 400 and "invalid adapter name" in r.json()["error"]["message"], bad
    r = httpx.post(url + "/admin/adapters", json={"name": "evil"}, headers=auth)
    assert r.status_code == 404
    shutil.copytree(env["paths"]["a2"], env["dir"] / "allowed" / "fresh")  # added while the server runs
    r = httpx.post(url + "/admin/adapters", json={"name": "fresh"}, headers=auth)
    assert r.json() == {"id": "fresh", "loaded": True}
    assert "fresh" in [m.id for m in env["client"].models.list().data]
    got = (
        env["client"]
        .completions.create(model="fresh", prompt="Hi", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    assert got == expected(env, "Hi", "a2", 6, chat=False)
    assert httpx.post(url + "/admin/adapters", json={"name": "late"}, headers=auth).json() == {
        "id": "late",
        "loaded": True,
    }
    got = (
        env["client"]
        .completions.create(model="late", prompt="Hi", max_tokens=6, temperature=0)
        .choices[0]
        .text
    )
    assert got == expected(env, "Hi", "a1", 6, chat=False)  # "late" is a copy of a1
    assert httpx.delete(url + "/admin/adapters/late", headers=auth).json() == {"id": "late", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        env["client"].completions.create(model="late", prompt="Hi", max_tokens=2)
    assert httpx.delete(url + "/admin/adapters/late", headers=auth).status_code == 404
    assert (
        httpx.post(url + "/admin/adapters", json={"name": "late"}, headers=auth).status_code == 200
    )  # back again


def test_lru_cache_keeps_at_most_max_loaded(env):
    url = env["server"].url
    for name in ("a4", "a3", "a2", "a1", "a4"):
        got = (
            env["client"]
            .completions.create(model=name, prompt="Cache", max_tokens=5, temperature=0)
            .choices[0]
            .text
        )
        assert got == expected(env, "Cache", name, 5, chat=False)
        loaded = httpx.get(url + "/health").json()["loaded_adapters"]
        assert len(loaded) <= 3 and loaded[-1] == name


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
    server, app = serve(env["folder"], {"a1": env["paths"]["a1"]}, "--max-queue", "1", "--max-batch", "1")
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


def test_cli_arguments():
    assert parse_adapters(["x=/a", "y=/b=c"]) == {"x": Path("/a"), "y": Path("/b=c")}
    for bad in (["/just/a/path"], ["x=/a", "x=/b"], ["=/a"]):
        with pytest.raises(ConfigError):
            parse_adapters(bad)
