"""Dataset formats: detect them from the columns, validate records, map class labels, build prompts.

Formats and the columns they need:
  - "completion": `text`; the loss covers every token.
  - "instruction": `instruction`, `output` (optional `input`), Alpaca style; loss on `output` only.
  - "chat": `messages` (list of {"role", "content"}) or ShareGPT `conversations` ({"from", "value"});
    loss on assistant turns only.
  - "classification": `text`, `label` (strings mapped to ids, or ints kept).
  - "prompt-completion": `prompt`, `completion` (TRL's and OpenAI's fine-tuning format): two strings,
    or two lists of chat messages (TRL's conversational form); loss on the completion only.
  - "input-target": `input`, `target` (seq2seq pairs); loss on the target only.
  - "token-tags": `tokens` (a list of words) and `tags` (or `ner_tags`: one tag per word, strings
    such as "B-PER" or ints), for token classification.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ConfigError, DataError

FORMATS = (
    "completion",
    "instruction",
    "chat",
    "classification",
    "prompt-completion",
    "input-target",
    "token-tags",
)
_REQUIRED = {
    "completion": ("text",),
    "instruction": ("instruction", "output"),
    "classification": ("text", "label"),
    "prompt-completion": ("prompt", "completion"),
    "input-target": ("input", "target"),
    "token-tags": ("tokens",),
}
# speaker names (chat roles and ShareGPT's) -> chat-template roles
_ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "tool": "tool",
}

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
CLASSIFY_TEMPLATE = "Classify the text as one of: {labels}.\n\nText: {text}"


def detect_format(records: Sequence[dict], fmt: str | None = None) -> str:
    """The format of `records` ("completion", "instruction", "chat" or "classification").

    With `fmt` given, checks that every record has that format's columns; otherwise picks the format
    from the first record's columns (chat, then instruction, then classification, then completion)
    and checks every record against it. Raises `DataError` for an empty dataset or a record missing
    a needed column (naming the record, the column and the columns present), `ConfigError` for an
    unknown `fmt`.
    """
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
    if not records:
        raise DataError("the dataset is empty; give at least one record")
    if fmt is None:
        fmt = _guess(records[0])
    for i, record in enumerate(records):
        _check(record, fmt, i)
    return fmt


def _guess(record: dict) -> str:
    keys = set(record)
    if keys & {"messages", "conversations"}:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "instruction"
    for fmt in ("prompt-completion", "input-target"):
        if set(_REQUIRED[fmt]) <= keys:
            return fmt
    if "tokens" in keys and keys & {"tags", "ner_tags"}:
        return "token-tags"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "completion"
    raise DataError(
        f"cannot tell the data format from the columns {sorted(keys)}; expected `text` (completion), "
        "`instruction`+`output` (instruction), `messages` or `conversations` (chat), `text`+`label` "
        "(classification), `prompt`+`completion`, `input`+`target` (seq2seq) or `tokens`+`tags` "
        "(token classification); rename the columns or pass the format explicitly"
    )


def _check(record: dict, fmt: str, i: int) -> None:
    if not isinstance(record, dict):
        raise DataError(f"record {i}: expected an object, got {type(record).__name__}")
    if fmt == "chat":
        chat_messages(record, i)
        return
    if fmt == "token-tags":
        word_tags(record, i)
        return
    for column in _REQUIRED[fmt]:
        if record.get(column) is None:
            what = "missing column" if column not in record else "null value in column"
            raise DataError(
                f"record {i}: {what} {column!r} needed by the {fmt} format; columns present: {sorted(record)}"
            )
    label = record.get("label")
    if fmt == "classification" and not isinstance(label, (str, int, float)):  # bool is an int
        raise DataError(
            f"record {i}: column 'label' must be a string or a number, got {type(label).__name__}"
        )
    if fmt == "prompt-completion" and isinstance(record["prompt"], list):
        prompt_completion_messages(record, i)
        return
    for column in ("text", "instruction", "input", "output", "prompt", "completion", "target"):
        if column in record and record[column] is not None and not isinstance(record[column], str):
            raise DataError(
                f"record {i}: column {column!r} must be a string, got {type(record[column]).__name__}"
            )


def chat_messages(record: dict, i: int = 0) -> list[dict[str, str]]:
    """The record's conversation as [{"role", "content"}] from `messages` or ShareGPT `conversations`.

    Each turn may use role/content or ShareGPT's from/value keys (human/gpt become user/assistant).
    Raises `DataError` (naming record `i`) if there is no conversation, a turn is malformed or has an
    unknown role, or no turn is from the assistant (nothing to learn from).
    """
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"record {i}: the chat format needs a non-empty list in `messages` (or ShareGPT `conversations`); "
            f"columns present: {sorted(record)}"
        )
    out = []
    for j, turn in enumerate(turns):
        sharegpt = isinstance(turn, dict) and "from" in turn
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise DataError(
                f"record {i}, turn {j}: expected an object with {role_key!r} and a string {content_key!r}"
            )
        role = _ROLE_NAMES.get(turn.get(role_key))
        if role is None:
            raise DataError(
                f"record {i}, turn {j}: unknown role {turn.get(role_key)!r}; use one of {sorted(_ROLE_NAMES)}"
            )
        out.append({"role": role, "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"record {i}: the conversation has no assistant turn, so there is nothing to train on"
        )
    return out


def label_key(label: Any) -> str:
    """The string a label is known by in a label map (ints and int-like strings by their digits)."""
    if isinstance(label, bool):
        return str(label).lower()
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label)


def build_label_map(records: Iterable[dict]) -> dict[str, int]:
    """Map class labels to ids: string labels sorted (stable), int labels (or int-like strings) kept.

    Raises `DataError` for a record without a label, or a dataset with fewer than two classes.
    """
    keys = set()
    for i, record in enumerate(records):
        label = record.get("label")
        if label is None or label == "" or label != label:  # label != label: NaN from pandas/Parquet
            raise DataError(f"record {i}: missing `label`; classification needs a label on every record")
        keys.add(label_key(label))
    if len(keys) < 2:
        raise DataError(f"classification needs at least two different labels, found {sorted(keys)}")
    if all(k.lstrip("-").isdigit() for k in keys):
        mapping = {k: int(k) for k in keys}
        if min(mapping.values()) < 0:
            raise DataError(f"integer labels must be >= 0, found {sorted(mapping.values())}")
        return dict(sorted(mapping.items(), key=lambda kv: kv[1]))
    return {k: i for i, k in enumerate(sorted(keys))}


def instruction_prompt(record: dict) -> str:
    """The Alpaca prompt for an instruction record (what the model sees before its response)."""
    text_input = record.get("input") or ""
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if text_input else "",
        instruction=record["instruction"],
        input_block=f"### Input:\n{text_input}\n\n" if text_input else "",
    )


def classification_as_instruction(
    records: Iterable[dict], template: str = CLASSIFY_TEMPLATE, labels: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Turn classification records into instruction records whose response is the label word.

    `template` is formatted with `text` and `labels` (the label names joined by ", "; taken from the
    records, sorted, unless given). Used to teach a causal LM to answer with the class name; score
    it by generating from `instruction_prompt(record)`. Raises `DataError` for a record without
    `text` or `label`.
    """
    records = list(records)
    detect_format(records, "classification")
    names = list(labels) if labels is not None else sorted({label_key(r["label"]) for r in records})
    joined = ", ".join(names)
    return [
        {
            "instruction": template.format(text=r["text"], labels=joined),
            "input": "",
            "output": label_key(r["label"]),
        }
        for r in records
    ]


def prompt_completion_messages(record: dict, i: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(prompt turns, completion turns) of a conversational prompt/completion record (TRL's form:
    both are lists of chat messages). Raises `DataError` (naming record `i`) when one is not a
    list, a turn is malformed, or the completion has no assistant turn."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, list) or not isinstance(completion, list) or not completion:
        raise DataError(
            f"record {i}: a conversational prompt/completion record needs a list of messages in both "
            f"`prompt` and `completion`, got {type(prompt).__name__} and {type(completion).__name__}"
        )
    turns = chat_messages({"messages": prompt + completion}, i)
    prompt_turns, completion_turns = turns[: len(prompt)], turns[len(prompt) :]
    if not any(m["role"] == "assistant" for m in completion_turns):
        raise DataError(f"record {i}: the completion has no assistant turn, so there is nothing to train on")
    return prompt_turns, completion_turns


def word_tags(record: dict, i: int = 0) -> tuple[list[str], list]:
    """(words, tags) of a token-tags record: `tokens` and `tags` (or `ner_tags`), lists of the same
    length, words strings and tags strings or ints. Raises `DataError` naming record `i`."""
    words, tags = record.get("tokens"), record.get("tags", record.get("ner_tags"))
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        raise DataError(f"record {i}: `tokens` must be a non-empty list of strings (the words)")
    if not isinstance(tags, list) or len(tags) != len(words):
        got = len(tags) if isinstance(tags, list) else type(tags).__name__
        raise DataError(
            f"record {i}: `tags` (or `ner_tags`) must be a list with one tag per word: "
            f"{len(words)} words, tags: {got}"
        )
    for j, tag in enumerate(tags):
        if isinstance(tag, bool) or not isinstance(tag, (str, int)) or tag == "":
            raise DataError(f"record {i}, word {j}: tag {tag!r} must be a non-empty string or an integer")
    return words, tags


def build_tag_map(records: Iterable[dict]) -> dict[str, int]:
    """Map the tags of token-tags records to ids: integer tags (or int-like strings) keep their
    values; string tags are sorted with "O" first (id 0), so the map is stable across runs.
    Raises `DataError` for a malformed record or fewer than two different tags."""
    keys = {label_key(t) for i, r in enumerate(records) for t in word_tags(r, i)[1]}
    if len(keys) < 2:
        raise DataError(f"token classification needs at least two different tags, found {sorted(keys)}")
    if all(k.lstrip("-").isdigit() for k in keys):
        ids = sorted(int(k) for k in keys)
        if ids[0] < 0:
            raise DataError(f"integer tags must be >= 0, found {ids}")
        return {str(k): k for k in ids}
    return {k: i for i, k in enumerate(sorted(keys, key=lambda k: (k != "O", k)))}


def prompt_and_answer(record: dict, fmt: str) -> tuple[str, str]:
    """The (source, target) strings of a prompt-completion, input-target or instruction record."""
    if fmt == "instruction":
        return instruction_prompt(record), record["output"]
    return (
        (record["prompt"], record["completion"])
        if fmt == "prompt-completion"
        else (record["input"], record["target"])
    )
