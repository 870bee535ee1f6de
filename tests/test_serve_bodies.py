"""lorakit.serve.bodies: strict request models, refused unsupported fields, readable error
locations, and limits that must be positive (the HTTP side is in test_serve_app.py)."""

import pytest
from pydantic import ValidationError

from lorakit.errors import ConfigError
from lorakit.serve.bodies import ChatBody, CompletionBody, Limits, _where, message_text


def test_bodies_are_strict():
    ok = CompletionBody.model_validate({"model": "a", "prompt": [1, 2], "temperature": 0, "user": "x"})
    assert ok.prompt == [1, 2] and ok.temperature == 0
    for bad in (
        {"prompt": "x", "temperature": "1"},
        {"prompt": [True]},
        {"prompt": "\ud800"},
        {"prompt": "x", "stop": ["s"] * 17},
        {"prompt": "x", "echo": True},
        {"prompt": "x", "best_of": True},  # True is not 1
    ):
        with pytest.raises(ValidationError):
            CompletionBody.model_validate({"model": "a", **bad})
    chat = ChatBody.model_validate(
        {
            "model": "a",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        }
    )
    assert message_text(chat.messages[0].content) == "ab"
    with pytest.raises(ValidationError):
        ChatBody.model_validate(
            {"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
        )


def test_error_locations_drop_union_tags():
    assert _where(("messages", 0, "content", "list[TextPart]", 0, "text")) == "messages.0.content.0.text"
    assert _where(("temperature", "float")) == "temperature"
    assert _where(("prompt", "function-after[_utf8(), str]")) == "prompt"
    assert _where(()) == "body"


def test_limits_must_be_positive():
    Limits(1, 1, 1, 0.1)
    for bad in (
        {"max_tokens": 0},
        {"max_body_bytes": -1},
        {"body_timeout": float("inf")},
        {"max_prompt_tokens": True},
    ):
        with pytest.raises(ConfigError, match="must be a positive number"):
            Limits(**bad)
