"""Tokenize records into training examples with the loss masked to the part the model must learn.

causal-lm examples are {"input_ids", "labels"}, labels = -100 where no loss is taken (prompt tokens
of instruction data, non-assistant turns of chat data); classification examples are
{"input_ids", "label"}. Sequences longer than `max_length` are cut and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DataError
from ..tasks import CAUSAL_LM, CLASSIFICATION, IGNORE_INDEX, check_task
from .formats import (
    build_label_map,
    chat_messages,
    classification_as_instruction,
    detect_format,
    instruction_prompt,
    label_key,
)

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """Tokenized examples; `truncated` counts sequences cut to max_length, `dropped` those left with no
    supervised token after the cut (they are not in `examples`)."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def encode(
    records: Sequence[dict],
    tokenizer: Any,
    fmt: str | None,
    *,
    max_length: int,
    label_map: dict[str, int] | None = None,
    task: str = CAUSAL_LM,
) -> Encoded:
    """Tokenize `records` of format `fmt` (see `detect_format`; None detects it) for `task`.

    causal-lm: completion data trains on all tokens; instruction data (Alpaca prompt, see
    `instruction_prompt`) only on the output; chat data (rendered with the tokenizer's chat template)
    only on assistant turns, including the template's end-of-turn token. EOS is appended after
    completion text and instruction outputs so the model learns to stop. Classification records
    with task causal-lm are first turned into instruction records whose answer is the label word
    (`classification_as_instruction`, listing the names in `label_map`, or the records' labels).
    classification: needs fmt "classification"; `label_map` defaults to `build_label_map(records)`.
    Raises `DataError` for an empty dataset, a record missing a needed column, a label not in
    `label_map` or a chat the template cannot render (naming the record), no example left with a
    response token after truncation; `ConfigError` for a bad task/format pair, max_length, or a tokenizer
    without EOS or chat template.
    """
    check_task(task)
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    fmt = detect_format(records, fmt)  # every record has the columns `fmt` needs (None: detect it)
    if task == CLASSIFICATION:
        if fmt != "classification":
            raise ConfigError(
                f"task 'classification' needs data in the classification format (text, label), not {fmt!r}"
            )
        return _encode_classification(records, tokenizer, max_length, label_map)
    if fmt == "classification":
        # the prompt lists the label names: take them from label_map so train and eval prompts agree
        names = list(label_map) if label_map is not None else None
        records, fmt = classification_as_instruction(records, labels=names), "instruction"
    eos = tokenizer.eos_token_id
    if eos is None and fmt != "chat":
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before encoding")
    if fmt == "completion":
        texts = [_with_eos(ids, eos) for ids in _tokens(tokenizer, [r["text"] for r in records], True)]
        pairs = ((ids, list(ids)) for ids in texts)  # separate lists: a caller may edit labels in place
    elif fmt == "instruction":
        prompts = _tokens(tokenizer, [instruction_prompt(r) for r in records], True)
        answers = [_with_eos(ids, eos) for ids in _tokens(tokenizer, [r["output"] for r in records], False)]
        pairs = ((p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers))
    else:
        pairs = _encode_chats(tokenizer, records)
    out = Encoded()
    for ids, labels in pairs:
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
            out.dropped += 1
            continue
        out.examples.append({"input_ids": ids, "labels": labels})
    _log_counts(out, max_length)
    if not out.examples:
        raise DataError(
            f"none of the {len(records)} records has a response token within max_length={max_length}; "
            "raise max_length or shorten the prompts"
        )
    return out


def _log_counts(out: Encoded, max_length: int) -> None:
    if out.truncated:
        log.warning(
            "%d sequences were longer than max_length=%d and were truncated", out.truncated, max_length
        )
    if out.dropped:
        log.warning("%d examples had no response token left within max_length and were dropped", out.dropped)


def _tokens(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of each text; one batched call, which a fast tokenizer runs in parallel."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]] if texts else []


def _with_eos(ids: list[int], eos: int) -> list[int]:
    # some tokenizers append EOS themselves (add_eos_token); never learn two
    return ids if ids and ids[-1] == eos else ids + [eos]


def _encode_classification(
    records: Sequence[dict], tokenizer: Any, max_length: int, label_map: dict[str, int] | None
) -> Encoded:
    if label_map is None:
        label_map = build_label_map(records)
    labels = []
    for i, record in enumerate(records):
        key = label_key(record.get("label"))
        if key not in label_map:
            raise DataError(
                f"record {i}: label {key!r} was not seen in the training labels {sorted(label_map)}; "
                "fix the record or train with this label"
            )
        labels.append(label_map[key])
    out = Encoded()
    for ids, label in zip(_tokens(tokenizer, [r["text"] for r in records], True), labels):
        if len(ids) > max_length:
            ids = ids[:max_length]
            out.truncated += 1
        out.examples.append({"input_ids": ids, "label": label})
    _log_counts(out, max_length)
    return out


def _render(tokenizer: Any, messages: list[dict], i: int, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja raises its own errors for conversations a template rejects
        raise DataError(
            f"record {i}: the tokenizer's chat template cannot render this conversation ({e})"
        ) from e


def _encode_chats(tokenizer: Any, records: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the chat format needs a tokenizer with a chat template (tokenizer.chat_template is empty)"
        )
    rendered = [_render_chat(tokenizer, chat_messages(r, i), i) for i, r in enumerate(records)]
    try:
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise ConfigError(
            "the chat format needs a fast tokenizer that reports character offsets, to find the assistant "
            f"tokens; this one does not ({e})"
        ) from e
    pairs = []
    for (_, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"]):
        # a token is learned when it starts inside an assistant span
        labels = [
            t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for t, (start, _) in zip(ids, offsets)
        ]
        pairs.append((list(ids), labels))
    return pairs


def _render_chat(tokenizer: Any, messages: list[dict], i: int) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns. A turn's span is found by
    rendering the conversation up to it (with the generation prompt) and up to its end: the
    difference is what the model must say, including the template's end-of-turn token."""
    text = _render(tokenizer, messages, i)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:j], i, generation_prompt=True) if j else ""
        upto = _render(tokenizer, messages[: j + 1], i)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"record {i}, turn {j}: the chat template does not render this conversation turn by turn "
                "(a prefix renders differently), so assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto.rstrip())))  # the newline after end-of-turn is not learned
    return text, spans
