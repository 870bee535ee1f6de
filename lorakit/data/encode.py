"""Tokenize records into training examples with the loss masked to the part the model must learn.

causal-lm examples are {"input_ids", "labels"}, labels = -100 where no loss is taken (prompt tokens
of instruction and prompt-completion data, non-assistant turns of chat data); classification
examples are {"input_ids", "label"}; seq2seq examples {"input_ids", "target_ids"} (the encoder's
input, the decoder's target); token-classification examples {"input_ids", "token_labels"} (a tag
id per token, -100 on special tokens and on every sub-token but a word's first). Sequences longer than `max_length` are cut and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DataError
from ..tasks import CAUSAL_LM, CLASSIFICATION, IGNORE_INDEX, SEQ2SEQ, TOKEN_CLASSIFICATION, check_task
from .formats import (
    build_label_map,
    build_tag_map,
    chat_messages,
    classification_as_instruction,
    detect_format,
    label_key,
    prompt_and_answer,
    prompt_completion_messages,
    word_tags,
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
    chat_template: bool = False,
) -> Encoded:
    """Tokenize `records` of format `fmt` (see `detect_format`; None detects it) for `task`.

    causal-lm: completion data trains on all tokens; instruction data (Alpaca prompt, see
    `instruction_prompt`) only on the output; chat data (rendered with the tokenizer's chat template)
    only on assistant turns, including the template's end-of-turn token. prompt-completion (and
    input-target) data trains on the completion: plain text (the prompt's tokens, then the
    completion's), or, with `chat_template` or when both are message lists (TRL's conversational
    form), rendered by the chat template with the prompt as the user turn(s) and the loss on the
    completion's assistant turns. EOS is appended after completion text and instruction outputs so
    the model learns to stop. Classification records with task causal-lm are first turned into
    instruction records whose answer is the label word (`classification_as_instruction`, listing
    the names in `label_map`, or the records' labels).
    classification: needs fmt "classification"; `label_map` defaults to `build_label_map(records)`.
    seq2seq: {"input_ids", "target_ids"} from input-target, prompt-completion (strings) or
    instruction records; the target ends with EOS. token-classification: {"input_ids",
    "token_labels"} from token-tags records (see `encode_token_tags`).
    Raises `DataError` for an empty dataset, a record missing a needed column, a label not in
    `label_map` or a chat the template cannot render (naming the record), no example left with a
    response token after truncation; `ConfigError` for a bad task/format pair, max_length, or a tokenizer
    without EOS or chat template.
    """
    check_task(task)
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    fmt = detect_format(records, fmt)  # every record has the columns `fmt` needs (None: detect it)
    needed = {CLASSIFICATION: ("classification",), TOKEN_CLASSIFICATION: ("token-tags",)}.get(task)
    if task == SEQ2SEQ:
        needed = ("input-target", "prompt-completion", "instruction")
    if needed and fmt not in needed:
        raise ConfigError(f"task {task!r} needs data in the {' or '.join(needed)} format, not {fmt!r}")
    if task == CLASSIFICATION:
        return _encode_classification(records, tokenizer, max_length, label_map)
    if task == TOKEN_CLASSIFICATION:
        return encode_token_tags(records, tokenizer, max_length, label_map)
    if task == SEQ2SEQ:
        return _encode_seq2seq(records, tokenizer, fmt, max_length)
    if fmt == "token-tags":
        raise ConfigError(
            "token-tags data trains task 'token-classification'; pass --task token-classification"
        )
    if fmt == "classification":
        # the prompt lists the label names: take them from label_map so train and eval prompts agree
        names = list(label_map) if label_map is not None else None
        records, fmt = classification_as_instruction(records, labels=names), "instruction"
    conversational = _conversational(records, fmt)
    eos = tokenizer.eos_token_id
    if eos is None and fmt != "chat" and not (conversational or chat_template):
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before encoding")
    if fmt == "completion":
        texts = [_with_eos(ids, eos) for ids in _tokens(tokenizer, [r["text"] for r in records], True)]
        pairs = ((ids, list(ids)) for ids in texts)  # separate lists: a caller may edit labels in place
    elif fmt == "chat":
        pairs = _encode_chats(tokenizer, [(chat_messages(r, i), 0) for i, r in enumerate(records)])
    elif uses_chat_template(records, fmt, chat_template):
        pairs = _encode_chats(tokenizer, _prompt_chats(records, fmt, conversational))
    else:
        sources, targets = zip(*(prompt_and_answer(r, fmt) for r in records))
        prompts = _tokens(tokenizer, list(sources), True)
        answers = [_with_eos(ids, eos) for ids in _tokens(tokenizer, list(targets), False)]
        pairs = ((p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers))
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


def uses_chat_template(records: Sequence[dict], fmt: str, chat_template: bool = False) -> bool:
    """Whether `encode` renders these causal-LM records with the tokenizer's chat template: chat
    records always; prompt-completion and input-target records with `chat_template`, or when their
    prompts are message lists (TRL's conversational form); never completion or instruction text."""
    if fmt == "chat":
        return True
    return fmt in ("prompt-completion", "input-target") and (chat_template or _conversational(records, fmt))


def _conversational(records: Sequence[dict], fmt: str) -> bool:
    """TRL's conversational prompt-completion form: the prompts are message lists."""
    return fmt == "prompt-completion" and isinstance(records[0]["prompt"], list)


def _prompt_chats(records: Sequence[dict], fmt: str, conversational: bool) -> list[tuple[list[dict], int]]:
    """(messages, index of the first turn to learn) per prompt-completion or input-target record:
    TRL's conversational records as they are, text records as one user and one assistant turn."""
    chats = []
    for i, record in enumerate(records):
        if conversational != isinstance(record.get("prompt"), list):
            raise DataError(
                f"record {i}: the dataset mixes conversational (message list) and plain-text prompts; "
                "use one form for every record"
            )
        if conversational:
            prompt, completion = prompt_completion_messages(record, i)
        else:
            source, target = prompt_and_answer(record, fmt)
            prompt, completion = (
                [{"role": "user", "content": source}],
                [{"role": "assistant", "content": target}],
            )
        chats.append((prompt + completion, len(prompt)))
    return chats


def _encode_seq2seq(records: Sequence[dict], tokenizer: Any, fmt: str, max_length: int) -> Encoded:
    if fmt == "prompt-completion" and any(isinstance(r["prompt"], list) for r in records):
        raise ConfigError("task 'seq2seq' takes plain-text prompt/completion records, not message lists")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before encoding")
    sources, targets = zip(*(prompt_and_answer(r, fmt) for r in records))
    out = Encoded()
    # the target as the model's own tokenizer frames it (T5: text </s>; BART: <s> text </s>)
    targets = [_with_eos(ids, eos) for ids in _tokens(tokenizer, list(targets), True)]
    for source, target in zip(_tokens(tokenizer, list(sources), True), targets):
        if len(source) > max_length or len(target) > max_length:
            source, target = source[:max_length], target[:max_length]
            out.truncated += 1
        out.examples.append({"input_ids": source, "target_ids": target})
    _log_counts(out, max_length)
    return out


def encode_token_tags(
    records: Sequence[dict], tokenizer: Any, max_length: int, tag_map: dict[str, int] | None = None
) -> Encoded:
    """Token classification examples {"input_ids", "token_labels"} from token-tags records: the
    words are tokenized as pre-split words (`is_split_into_words`), each word's first sub-token
    carries its tag id and its other sub-tokens, like the special tokens, -100 (what transformers'
    token-classification example and PEFT's do). `tag_map` defaults to `build_tag_map(records)`.
    Raises `ConfigError` for a tokenizer that cannot report word ids (a slow one), `DataError` for
    a malformed record or a tag not in `tag_map`."""
    tag_map = build_tag_map(records) if tag_map is None else tag_map
    pairs = [word_tags(r, i) for i, r in enumerate(records)]
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "token classification needs a fast tokenizer (it reports which word each sub-token comes "
            "from); load the model's tokenizer.json"
        )
    enc = tokenizer([words for words, _ in pairs], is_split_into_words=True, add_special_tokens=True)
    out = Encoded()
    for i, (_, tags) in enumerate(pairs):
        ids, labels, previous = list(enc["input_ids"][i]), [], None
        for word in enc.word_ids(i):
            if word is None or word == previous:
                labels.append(IGNORE_INDEX)
            else:
                key = label_key(tags[word])
                if key not in tag_map:
                    raise DataError(
                        f"record {i}: tag {key!r} was not seen in the training tags {sorted(tag_map)}; "
                        "fix the record or train with this tag"
                    )
                labels.append(tag_map[key])
            previous = word
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
        out.examples.append({"input_ids": ids, "token_labels": labels})
    _log_counts(out, max_length)
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


def _encode_chats(tokenizer: Any, chats: list[tuple[list[dict], int]]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each (messages, first learned turn): the loss on the assistant turns from
    that turn on."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the chat format needs a tokenizer with a chat template (tokenizer.chat_template is empty)"
        )
    rendered = [_render_chat(tokenizer, messages, i, first) for i, (messages, first) in enumerate(chats)]
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


def _render_chat(
    tokenizer: Any, messages: list[dict], i: int, first: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant turns from turn `first` on. A
    turn's span is found by rendering the conversation up to it (with the generation prompt) and up
    to its end: the difference is what the model must say, including the template's end-of-turn
    token."""
    text = _render(tokenizer, messages, i)
    spans = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant" or j < first:
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
