"""lorakit.serve.app end to end: a real uvicorn server on loopback, the real `openai` client.

Greedy outputs equal `lorakit generate` (same code path), per adapter; streaming, auth, limits,
OpenAI-style errors (each bad input a 4xx with a message, never a 500), admin load/unload by name
only, LRU eviction seen through /health, and a body shorter than its Content-Length timing out.
"""

import shutil
import socket
import time

import httpx
import pytest
from fixtures import SERVE_KEY as KEY
from fixtures import Server, expected, serve_app

from lorakit.cli import main
from lorakit.generate import Row, Sampling, eos_ids, generate_text, generate_tokens, prompt_ids

openai = pytest.importorskip("openai")
BASE = "model"  # the base model's id: its folder's name


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
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="a1", prompt="x", max_tokens=2, n=17)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(url + "/v1/completions", content=b"x" * 1_100_000, headers=auth)
    assert r.status_code == 413
    assert httpx.get(url + "/v1/nothing", headers=auth).json()["error"]["message"]


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


def post(env, path: str, body=None, content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(env["server"].url + path, json=body, content=content, headers=headers, timeout=60)


def test_max_completion_tokens_is_honoured_and_zero_refused(env):
    chat = {"model": "a1", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    for field in ("max_completion_tokens", "max_tokens"):
        r = post(env, "/v1/chat/completions", {**chat, field: 0})
        assert r.status_code == 400 and "max_tokens must be between 1 and" in r.json()["error"]["message"]
        assert post(env, "/v1/chat/completions", {**chat, field: -3}).status_code == 400
    r = post(env, "/v1/chat/completions", {**chat, "max_tokens": 10, "max_completion_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    # the model's context (512 positions) bounds prompt + reply; the default reply fits in it
    r = post(env, "/v1/completions", {"model": "a1", "prompt": list(range(1, 500)), "max_tokens": 20})
    assert r.status_code == 400 and "max_tokens must be between 1 and 13" in r.json()["error"]["message"]
    r = post(env, "/v1/completions", {"model": "a1", "prompt": list(range(1, 513)), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_bad_bodies_are_4xx_with_a_message(env):
    chat = {"model": "a1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    deep = b'{"model": "a1", "prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = {
        "not UTF-8": (b'{"model": "a1", "prompt": "\xff\xfe"}', "UTF-8"),
        "nested": (deep, "nests too deeply"),
        "part not a string": (
            {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "string",
        ),
        "image part": ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
        "seed too big": ({**chat, "seed": 2**70}, "seed"),
        "seed negative": ({**chat, "seed": -1}, "seed"),
        "seed a string": ({**chat, "seed": "1"}, "seed"),
        "lone surrogate": (b'{"model": "a1", "prompt": "\\ud800"}', "surrogate"),
        "no messages": ({**chat, "messages": []}, "messages"),
        "temperature a string": ({**chat, "temperature": "1"}, "temperature"),
        "temperature NaN": (b'{"model": "a1", "prompt": "x", "temperature": NaN}', "temperature"),
        "stream not a bool": ({**chat, "stream": "yes"}, "stream"),
        "a list": ([1, 2], "body"),
    }
    for what, (body, word) in cases.items():
        path = "/v1/completions" if isinstance(body, bytes) else "/v1/chat/completions"
        r = post(env, path, content=body) if isinstance(body, bytes) else post(env, path, body)
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert word in r.json()["error"]["message"], (what, r.json())
    assert post(env, "/v1/chat/completions", chat).status_code == 200  # the server is fine after all that


def test_body_shorter_than_content_length_times_out(env):
    server = Server(serve_app(env["folder"], {}, "--body-timeout", "0.5"))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n".encode()
                + b'{"model":'
            )
            start, reply = time.monotonic(), b""
            while chunk := s.recv(65536):  # the server answers, then closes the connection
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive" in reply
        assert time.monotonic() - start < 5
    finally:
        server.stop()


def test_dotted_adapter_names_are_served(env):
    url, auth = env["server"].url, {"Authorization": f"Bearer {KEY}"}
    shutil.copytree(env["paths"]["a2"], env["dir"] / "allowed" / "my.v1.2")
    r = httpx.post(url + "/admin/adapters", json={"name": "my.v1.2"}, headers=auth)
    assert r.json() == {"id": "my.v1.2", "loaded": True}
    got = env["client"].completions.create(model="my.v1.2", prompt="Hi", max_tokens=6, temperature=0)
    assert got.choices[0].text == expected(env, "Hi", "a2", 6, chat=False)
    assert httpx.delete(url + "/admin/adapters/my.v1.2", headers=auth).json()["deleted"]


def test_unsupported_fields_are_refused_not_ignored(env):
    body = {"model": "a1", "prompt": "Hi", "max_tokens": 2}
    for extra in (
        {"echo": True},
        {"best_of": 2},
        {"logit_bias": {"5": 1}},
    ):
        r = post(env, "/v1/completions", {**body, **extra})
        assert r.status_code == 400 and "not supported" in r.json()["error"]["message"], extra
    r = post(env, "/v1/completions", {**body, "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and "json_object" in r.json()["error"]["message"]
    neutral = {"echo": False, "best_of": 1, "user": "someone"}
    assert post(env, "/v1/completions", {**body, **neutral}).status_code == 200
    r = post(env, "/admin/adapters", {"name": "model"})  # the base model's id
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]


def test_defaults_fit_the_room_and_unknown_model_comes_first(env):
    # completions default to 16 tokens; near the end of the context the default shrinks to fit
    r = post(env, "/v1/completions", {"model": "a1", "prompt": list(range(1, 505)), "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    r = post(env, "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 404  # the model is checked before the other fields


def test_health_says_when_the_worker_is_not_running(env):
    from fastapi.testclient import TestClient

    from lorakit.serve import AdapterCache, Engine, create_app

    engine = Engine(env["ref"], env["tok"], AdapterCache(env["ref"]))
    client = TestClient(create_app(engine, "model"))  # no `with`: the lifespan (worker) never starts
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "stopped"}


def test_n_seeds_penalties_logprobs_and_usage(env):
    client = env["client"]
    kw = {"model": "a2", "prompt": "Dice", "max_tokens": 6, "temperature": 0.9, "seed": 5}
    got = client.completions.create(n=3, **kw)
    want = [
        generate_text(env["ref"], env["tok"], "Dice", "a2", Sampling(6, 0.9, 1.0, 5 + i), chat=False)
        for i in range(3)
    ]
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want
    ref, tok = env["ref"], env["tok"]
    n_tokens = [
        sum(t is not None for _, t, _ in generate_tokens(ref, [row], eos_ids(ref, tok), 0))
        for row in (
            Row(prompt_ids(tok, "Dice", chat=False), "a2", Sampling(6, 0.9, 1.0, 5 + i)) for i in range(3)
        )
    ]
    assert got.usage.completion_tokens == sum(n_tokens) and got.usage.prompt_tokens == len(
        tok("Dice")["input_ids"]
    )
    streamed = ["", ""]
    for chunk in client.completions.create(n=2, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == want[:2]
    penalized = client.completions.create(
        model="a1", prompt="Again and again", max_tokens=10, temperature=0, frequency_penalty=1.5
    )
    assert penalized.choices[0].text == generate_text(
        env["ref"], env["tok"], "Again and again", "a1", Sampling(10, 0.0, 1.0, None, 0.0, 1.5), chat=False
    )
    lp = client.completions.create(model="a1", prompt="Hi", max_tokens=5, temperature=0, logprobs=2)
    c = lp.choices[0]
    assert len(c.logprobs.tokens) == lp.usage.completion_tokens == len(c.logprobs.token_logprobs)
    assert all(
        len(top) <= 2 and max(top.values()) >= p - 1e-5
        for top, p in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs)
    )
    chat = client.chat.completions.create(
        model="a1",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)  # greedy


def test_metrics_are_prometheus_text(env):
    env["client"].completions.create(model="a1", prompt="Measure", max_tokens=3, temperature=0)
    r = httpx.get(env["server"].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    for name in ("lorakit_queue_depth", "lorakit_rows_in_flight", "lorakit_tokens_per_second"):
        assert any(line.startswith(name + " ") for line in lines), name
    assert any(line.startswith('lorakit_requests_total{adapter="a1",outcome=') for line in lines)
    count = next(
        line for line in lines if line.startswith('lorakit_time_to_first_token_seconds_count{adapter="a1"}')
    )
    inf = next(
        line
        for line in lines
        if line.startswith('lorakit_time_to_first_token_seconds_bucket{adapter="a1",le="+Inf"}')
    )
    assert int(count.split()[-1]) == int(inf.split()[-1]) >= 1
    assert httpx.get(env["server"].url + "/metrics").status_code == 401  # behind the key


def test_vllm_load_and_unload_endpoints(env):
    url, auth = env["server"].url, {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": "a4"}, headers=auth)
    assert r.status_code == 200 and "added successfully" in r.text
    got = env["client"].completions.create(model="v", prompt="Hi", max_tokens=6, temperature=0)
    assert got.choices[0].text == expected(env, "Hi", "a4", 6, chat=False)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": "a4"}, headers=auth)
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    outside = str(env["dir"] / "outside" / "evil")
    for path in (outside, "../outside/evil"):
        r = httpx.post(
            url + "/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": path}, headers=auth
        )
        assert r.status_code == 400 and "outside the allowed adapter folder" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": "a4"})
    assert r.status_code == 401
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=auth)
    assert r.status_code == 200 and "removed successfully" in r.text
    with pytest.raises(openai.NotFoundError):
        env["client"].completions.create(model="v", prompt="Hi", max_tokens=2)
    assert (
        httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=auth).status_code == 404
    )


def test_json_mode_replies_are_json_objects(env):
    # the tiny model's own replies are no JSON; in JSON mode every reply is a JSON prefix, and a
    # reply that ends with "stop" is a whole object (Python's json module is the reference)
    import json

    from lorakit.serve.json_mode import START, advance

    fmt = {"type": "json_object"}
    for i, temperature in enumerate((0, 1.0, 1.0)):
        r = env["client"].chat.completions.create(
            model="a1",
            messages=[{"role": "user", "content": "Give me JSON"}],
            max_tokens=40,
            temperature=temperature,
            seed=i,
            response_format=fmt,
        )
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{") and advance(START, text) is not None, text
        if finish == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert finish == "length" and r.usage.completion_tokens == 40
    r = post(env, "/v1/completions", {"model": "a1", "prompt": "{", "max_tokens": 3, "response_format": fmt})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("{")
