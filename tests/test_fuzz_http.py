"""Fuzzing the server's HTTP bodies (hypothesis): random JSON values, wrong types, huge and negative
numbers, NaN and infinities, odd Unicode (lone surrogates included), and raw bytes, sent to
/v1/completions and /v1/chat/completions (n, logprobs, penalties and stream options included) of a
real uvicorn server. Every answer must be a 2xx or a 4xx whose body is an OpenAI-style error with a
message; never a 500, never a hang (10 s timeout).
"""

import json

import httpx
import pytest
from fixtures import SERVE_KEY, Server, make_adapter, serve_app, tiny_chat_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

chars = st.characters(codec=None, exclude_categories=())  # surrogates included
text = st.text(chars, max_size=12) | st.sampled_from(["", "Hi", "\u0000", "\ud800", "🙂" * 3, "\u202e"])
numbers = (
    st.integers(-10, 10)
    | st.integers()
    | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**40])
    | st.floats(allow_nan=True, allow_infinity=True)
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=8,
)
maybe = lambda valid: valid | json_values  # noqa: E731 - a right-typed value or anything at all
common = {
    "model": maybe(st.sampled_from(["a1", "model", "nope"])),
    "max_tokens": maybe(st.integers(-2, 6)),
    "temperature": maybe(st.floats(-1, 3) | st.sampled_from([0, float("nan"), float("inf")])),
    "top_p": maybe(st.floats(-0.5, 1.5)),
    "seed": maybe(numbers),
    "stop": maybe(text | st.lists(text, max_size=20)),
    "stream": maybe(st.booleans()),
    "n": maybe(st.integers(0, 3)),
    "presence_penalty": maybe(st.floats(-3, 3)),
    "frequency_penalty": maybe(st.floats(-3, 3)),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
}
part = st.fixed_dictionaries({"type": maybe(st.just("text")), "text": maybe(text)})
message = st.fixed_dictionaries(
    {
        "role": maybe(st.sampled_from(["user", "system", "assistant"])),
        "content": maybe(text | st.lists(part, max_size=3)),
    }
)
completion_fields = {
    **common,
    "prompt": maybe(text | st.lists(text, max_size=2) | st.lists(numbers, max_size=4)),
    "logprobs": maybe(st.integers(-1, 21)),
}
chat_fields = {
    **common,
    "messages": maybe(st.lists(message, max_size=3)),
    "max_completion_tokens": maybe(st.integers(-2, 6)),
    "logprobs": maybe(st.booleans()),
    "top_logprobs": maybe(st.integers(-1, 21)),
}


@st.composite
def mutated(draw, valid: dict, fields: dict) -> dict:
    """`valid` with up to three fields replaced (by a right-typed value or anything) or dropped."""
    body = dict(valid)
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            body.pop(key, None)
        else:
            body[key] = draw(fields[key])
    return body


completion_body = mutated(
    {"model": "a1", "prompt": "Hi", "max_tokens": 3, "temperature": 0}, completion_fields
)
chat_body = mutated(
    {"model": "a1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}, chat_fields
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    folder = tiny_chat_model(d / "model")
    app = serve_app(
        folder, {"a1": make_adapter(folder, d / "a1", 1)}, "--max-tokens", "4", "--batch-wait-ms", "1"
    )
    server = Server(app)
    headers = {"Authorization": f"Bearer {SERVE_KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as c:
        yield c
    server.stop()


def encode(body, ascii_only: bool) -> bytes:
    # allow_nan: NaN/Infinity tokens; a lone surrogate becomes "\ud800" (ASCII) or invalid UTF-8 bytes
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert "data: [DONE]" in response.text, response.text
    else:
        assert response.json()["choices"], response.text


@SETTINGS
@given(body=st.one_of(completion_body, completion_body, json_values), ascii_only=st.booleans())
def test_completions_bodies(client, body, ascii_only):
    check(client.post("/v1/completions", content=encode(body, ascii_only)))


@SETTINGS
@given(body=st.one_of(chat_body, chat_body, json_values), ascii_only=st.booleans())
def test_chat_bodies(client, body, ascii_only):
    check(client.post("/v1/chat/completions", content=encode(body, ascii_only)))


@settings(max_examples=40, deadline=None)
@given(
    raw=st.binary(max_size=300),
    path=st.sampled_from(
        ["/v1/completions", "/v1/chat/completions", "/admin/adapters", "/v1/load_lora_adapter"]
    ),
)
def test_raw_bytes(client, raw, path):
    check(client.post(path, content=raw))
