"""JSON mode (`response_format: {"type": "json_object"}`): a decoder that only takes tokens keeping
the reply a valid prefix of one JSON object.

`advance` is an incremental checker of RFC 8259 text whose top-level value is an object (opened
by the reply's first character: a model cannot spend its tokens on leading whitespace), fed
character by character; its state is an immutable tuple, so a
candidate token is tried without copying anything. The reply ends (finish reason "stop") as soon as
the object closes; a reply cut by `max_tokens` or a stop string is a truncated object, as with
OpenAI.

Picking a token (`JsonRow.choose`): the row's ordinary choice (greedy, or a sample after
penalties, temperature and top-p) is tried first; a token that would break the JSON (or end the
reply before the object closes) is removed and the choice made again from what is left. For a
greedy row that is the most likely valid token; for a sampled row, rejection with renormalisation,
which samples exactly from the row's distribution restricted to the valid tokens.
"""

from __future__ import annotations

import torch

from ..generate import Sampling, sample_probs

_WS = " \t\n\r"
_NUMBER_END = {"zero", "int", "frac", "exp"}  # number states where the number may end
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}

# (stack of open containers "{" / "[", mode, detail): the start expects the top-level "{"
START: tuple = ((), "start", None)


def advance(state: tuple | None, text: str) -> tuple | None:
    """The state after `text`, or None when `state` + `text` is no prefix of a JSON object."""
    for ch in text:
        if state is None:
            return None
        state = _step(state, ch)
    return state


def complete(state: tuple | None) -> bool:
    """Whether the text so far is a whole JSON object."""
    return state is not None and state[1] == "done"


def _after_value(stack: tuple) -> tuple:
    return (stack, "done", None) if not stack else (stack, "next", None)


def _step(state: tuple, ch: str) -> tuple | None:
    stack, mode, detail = state
    if mode == "string":
        if ch == '"':
            return (stack, "colon", None) if detail == "key" else _after_value(stack)
        if ch == "\\":
            return (stack, "escape", detail)
        return None if ord(ch) < 0x20 else state
    if mode == "escape":
        if ch == "u":
            return (stack, "unicode", (detail, 4))
        return (stack, "string", detail) if ch in '"\\/bfnrt' else None
    if mode == "unicode":
        kind, left = detail
        if ch not in "0123456789abcdefABCDEF":
            return None
        return (stack, "string", kind) if left == 1 else (stack, "unicode", (kind, left - 1))
    if mode == "literal":
        if not detail or ch != detail[0]:
            return None
        return (stack, "literal", detail[1:]) if len(detail) > 1 else _after_value(stack)
    if mode == "number":
        nxt = _number(detail, ch)
        if nxt is not None:
            return (stack, "number", nxt)
        if detail not in _NUMBER_END:
            return None
        return _step(_after_value(stack), ch)  # the number ended: `ch` belongs to what follows
    if mode == "start":  # the reply opens the object at once (no run of leading whitespace)
        return (("{",), "key_or_close", None) if ch == "{" else None
    if ch in _WS:
        return state
    if mode == "done":
        return None
    if mode in ("key_or_close", "key"):
        if ch == '"':
            return (stack, "string", "key")
        return _close(stack, ch) if mode == "key_or_close" and ch == "}" else None
    if mode == "colon":
        return (stack, "value", None) if ch == ":" else None
    if mode == "next":
        if ch == ",":
            return (stack, "key", None) if stack[-1] == "{" else (stack, "value", None)
        return _close(stack, ch)
    if mode == "value_or_close" and ch == "]":
        return _close(stack, ch)
    return _value(stack, ch)  # mode "value" or "value_or_close"


def _close(stack: tuple, ch: str) -> tuple | None:
    if stack and ch == {"{": "}", "[": "]"}[stack[-1]]:
        return _after_value(stack[:-1])
    return None


def _value(stack: tuple, ch: str) -> tuple | None:
    if ch == "{":
        return (stack + ("{",), "key_or_close", None)
    if ch == "[":
        return (stack + ("[",), "value_or_close", None)
    if ch == '"':
        return (stack, "string", "value")
    if ch in _LITERALS:
        return (stack, "literal", _LITERALS[ch])
    if ch == "-":
        return (stack, "number", "sign")
    if ch in "0123456789":
        return (stack, "number", "zero" if ch == "0" else "int")
    return None


def _number(part: str, ch: str) -> str | None:
    """The number's next part after `ch`, or None when `ch` does not continue it."""
    digit = ch in "0123456789"
    if part == "sign":
        return ("zero" if ch == "0" else "int") if digit else None
    if part in ("zero", "int") and ch == ".":
        return "dot"
    if part in ("zero", "int", "frac") and ch in "eE":
        return "e"
    if part == "e" and ch in "+-":
        return "esign"
    if not digit:
        return None
    return {"int": "int", "dot": "frac", "frac": "frac", "e": "exp", "esign": "exp", "exp": "exp"}.get(part)


class JsonRow:
    """One reply in JSON mode: its checker state and how it picks tokens (module docstring).
    `text_of(token)` is the token's text (decoded alone); `eos` the tokens that end a reply."""

    def __init__(self, text_of, eos: set[int]) -> None:
        self.text_of = text_of
        self.eos = eos
        self.state: tuple | None = START

    def valid(self, token: int) -> tuple | None:
        """The state after `token`, or None when it breaks the JSON (an end token never fits
        before the object is whole, and nothing fits after)."""
        if token in self.eos:
            return None
        text = self.text_of(token)
        return advance(self.state, text) if text else None

    def choose(self, logits: torch.Tensor, sampling: Sampling, generator, first: int) -> int:
        """The row's next token: `first` (its ordinary choice from `logits` [vocab], after
        penalties) when valid, else the choice again without the tokens that do not fit."""
        token, state = first, self.valid(first)
        if state is None:  # only then is the row's distribution needed
            token, state = self._choose_again(logits.clone(), sampling, generator, first)
        self.state = state
        return token

    def _choose_again(self, logits: torch.Tensor, sampling: Sampling, generator, token: int) -> tuple:
        """(token, state): the row's choice from `logits` without `token` and without every other
        token found not to fit."""
        probs = None if sampling.temperature == 0 else sample_probs(logits, sampling)
        for _ in range(logits.shape[-1]):
            logits[token] = float("-inf")
            if probs is not None:
                probs[token] = 0.0
                if bool(probs.sum() > 0):
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    probs = None  # no valid token within top-p: the most likely valid one
            if probs is None:
                token = int(logits.argmax())
                if logits[token] == float("-inf"):
                    break
            state = self.valid(token)
            if state is not None:
                return token, state
        raise RuntimeError("JSON mode: no token of the vocabulary continues the reply as JSON")

    @property
    def done(self) -> bool:
        """Whether the reply is a whole JSON object (it ends there)."""
        return complete(self.state)
