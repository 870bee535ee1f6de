"""Preference data: `prompt`/`chosen`/`rejected` pairs (DPO, ORPO, SimPO) and KTO's
`prompt`/`completion`/`label` records, as plain text or chat messages (TRL's formats).

Tokenized like TRL: the prompt alone and the prompt followed by each completion are tokenized (a
chat with the tokenizer's template, the prompt with the generation prompt; plain text with EOS after
the completion), and the completion starts where they stop agreeing. The loss covers completion tokens
only.

An example keeps the prompt once: `input_ids` is prompt + chosen + rejected (KTO: prompt + completion)
and `prompt_len`/`chosen_len`/`rejected_len` say where each part is. `collate_pairs` lays a batch out so
one forward scores both completions: the rejected tokens see the prompt and themselves, never the chosen
ones (a 4-D mask and position ids that restart after the prompt), so the prompt is encoded once.

Too long (prompt + the longer completion over `max_length`): the prompt is cut from the left first
(its end, next to the answer, stays), then the completions, each counted. Skipped and counted: a pair
whose chosen and rejected are identical. Errors (`DataError`, naming the record): a missing or
non-text column, a KTO label that is not a boolean, a KTO file with one label class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, DataError
from .encode import _render
from .formats import chat_messages

log = logging.getLogger(__name__)

PAIRS, UNPAIRED = "preference", "kto"
PREFERENCE_FORMATS = (PAIRS, UNPAIRED)
_COLUMNS = {PAIRS: ("prompt", "chosen", "rejected"), UNPAIRED: ("prompt", "completion", "label")}


@dataclass
class EncodedPreference:
    """Tokenized preference examples and what happened on the way (all counts of records)."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    prompt_truncated: int = 0
    completion_truncated: int = 0
    identical: int = 0  # pairs whose chosen equals rejected: skipped
    desirable: int = 0
    undesirable: int = 0


def preference_format(records: Sequence[dict]) -> str | None:
    """ "preference" or "kto" when the first record has those columns, else None (SFT data)."""
    keys = set(records[0]) if records and isinstance(records[0], dict) else set()
    if {"chosen", "rejected"} & keys:
        return PAIRS
    if {"prompt", "completion", "label"} <= keys:
        return UNPAIRED
    return None


def encode_preference(
    records: Sequence[dict], tokenizer: Any, fmt: str, *, max_length: int
) -> EncodedPreference:
    """Tokenize preference records of format `fmt` ("preference" or "kto"); see the module docstring.

    Raises `DataError` for a record missing a column (naming it and the columns present), a column of
    the wrong type, nothing left to train on, or a KTO dataset with only one label class;
    `ConfigError` for an unknown format or a tokenizer without EOS (plain text) or chat template."""
    if fmt not in PREFERENCE_FORMATS:
        raise ConfigError(f"unknown preference format {fmt!r}; choose one of {PREFERENCE_FORMATS}")
    if not records:
        raise DataError("the dataset is empty; give at least one record")
    out = EncodedPreference()
    answers = ("chosen", "rejected") if fmt == PAIRS else ("completion",)
    for i, record in enumerate(records):
        _check(record, fmt, i)
        if fmt == PAIRS and record["chosen"] == record["rejected"]:
            out.identical += 1
            continue
        prompt, parts = _tokenize(tokenizer, record, answers, i)
        if not prompt:  # the first answer token is predicted from the prompt's last one
            raise DataError(f"record {i}: the prompt has no tokens (before its answers); give it some text")
        prompt, parts = _fit(prompt, parts, max_length, out)
        ex = {"input_ids": prompt + [t for p in parts for t in p], "prompt_len": len(prompt)}
        if fmt == PAIRS:
            ex["chosen_len"], ex["rejected_len"] = len(parts[0]), len(parts[1])
        else:
            ex["completion_len"], ex["desirable"] = len(parts[0]), bool(record["label"])
            out.desirable += ex["desirable"]
            out.undesirable += not ex["desirable"]
        out.examples.append(ex)
    _report(out, max_length, len(records))
    if fmt == UNPAIRED and not (out.desirable and out.undesirable):
        raise DataError(
            f"KTO needs both desirable (label true) and undesirable (label false) examples; this data has "
            f"{out.desirable} desirable and {out.undesirable} undesirable. Add the other kind"
        )
    return out


def _check(record: Any, fmt: str, i: int) -> None:
    if not isinstance(record, dict):
        raise DataError(f"record {i}: expected an object, got {type(record).__name__}")
    for column in _COLUMNS[fmt]:
        if record.get(column) is None:
            raise DataError(
                f"record {i}: missing column {column!r} needed by {fmt} data "
                f"({', '.join(_COLUMNS[fmt])}); columns present: {sorted(record)}"
            )
    if fmt == UNPAIRED and not isinstance(record["label"], bool):
        raise DataError(
            f"record {i}: KTO's 'label' must be true (desirable) or false (undesirable), got {record['label']!r}"
        )
    text = isinstance(record["prompt"], str)
    for column in _COLUMNS[fmt][:-1] if fmt == UNPAIRED else _COLUMNS[fmt]:
        value = record[column]
        if text != isinstance(value, str) or not isinstance(value, (str, list)):
            raise DataError(
                f"record {i}: {column!r} must be text like the prompt or, for chat data, a list of messages "
                f"like the prompt's; got {type(value).__name__} with a {type(record['prompt']).__name__} prompt"
            )


def _tokenize(
    tokenizer: Any, record: dict, answers: tuple[str, ...], i: int
) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [ids of each answer]): each answer starts where prompt and prompt+answer diverge."""
    if isinstance(record["prompt"], str):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no EOS token; set tokenizer.eos_token before encoding")
        prompt = list(tokenizer(record["prompt"])["input_ids"])
        fulls = [list(tokenizer(record["prompt"] + record[a])["input_ids"]) for a in answers]
        fulls = [ids if ids and ids[-1] == eos else ids + [eos] for ids in fulls]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat preference data needs a tokenizer with a chat template")
        turns = {
            k: chat_messages({"messages": record[k] + [{"role": "assistant", "content": ""}]}, i)[:-1]
            for k in ("prompt", *answers)
        }  # each part validated on its own (no assistant needed)
        prompt = _chat_ids(tokenizer, _render(tokenizer, turns["prompt"], i, generation_prompt=True))
        fulls = [_chat_ids(tokenizer, _render(tokenizer, turns["prompt"] + turns[a], i)) for a in answers]
    keep = min(_common_prefix(prompt, full) for full in fulls)
    return prompt[:keep], [full[keep:] for full in fulls]


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _fit(
    prompt: list[int], parts: list[list[int]], max_length: int, out: EncodedPreference
) -> tuple[list[int], list[list[int]]]:
    """Cut the prompt from the left, then the completions from the right, so that the prompt and
    the longest completion fit in `max_length` (each completion keeps at least one token)."""
    longest = max(len(p) for p in parts)
    if len(prompt) + longest <= max_length:
        return prompt, parts
    room = max(max_length - longest, 1)  # a prompt token is kept: the first answer token is predicted from it
    if len(prompt) > room:
        prompt = prompt[len(prompt) - room :]
        out.prompt_truncated += 1
    if len(prompt) + longest > max_length:
        parts = [p[: max_length - len(prompt)] for p in parts]
        out.completion_truncated += 1
    return prompt, parts


def _report(out: EncodedPreference, max_length: int, n: int) -> None:
    if out.prompt_truncated or out.completion_truncated:
        log.warning(
            "%d prompts cut from the left and %d completions cut to fit max_length=%d",
            out.prompt_truncated,
            out.completion_truncated,
            max_length,
        )
    if out.identical:
        log.warning(
            "%d of %d pairs have identical chosen and rejected answers and were skipped", out.identical, n
        )
    if not out.examples:
        raise DataError(
            f"none of the {n} preference records is usable (identical chosen and rejected answers)"
        )


def collate_pairs(
    examples: Sequence[dict], pad_token_id: int, *, mask_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A batch of preference examples as one forward: each row is prompt + first + second
    completion (chosen/rejected; KTO: the completion and the KL completion `kl_ids`), right-padded.

    Gives `input_ids`, `position_ids` (the second completion restarts after the prompt), a 4-D
    additive mask [B, 1, T, T] (float `mask_dtype`; the second completion never sees the first), and
    for each completion `first_src`/`first_tgt` (or `second_*`): the position whose logits predict each
    token and the token, padded with -1. Reference log-probs carried by the examples come along."""
    rows = []
    for ex in examples:
        p, a = ex["prompt_len"], ex.get("chosen_len", ex.get("completion_len"))
        ids = list(ex["input_ids"][: p + a])
        second = list(ex["kl_ids"]) if "kl_ids" in ex else list(ex["input_ids"][p + a :])
        rows.append((ids[:p], ids[p:], second))
    width = max(len(pr) + len(a) + len(b) for pr, a, b in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
    }
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    spans = {k: [] for k in ("first", "second")}
    for r, (prompt, a, b) in enumerate(rows):
        p, n = len(prompt), len(prompt) + len(a) + len(b)
        batch["input_ids"][r, :n] = torch.tensor(prompt + a + b)
        batch["position_ids"][r, :n] = torch.tensor(list(range(p + len(a))) + list(range(p, p + len(b))))
        batch["position_ids"][r, n:] = torch.arange(width - n)
        allowed[r] = torch.ones(width, width, dtype=torch.bool).tril_()
        allowed[r, p + len(a) :, p : p + len(a)] = False  # the second completion does not see the first
        allowed[r, n:, :n] = False  # padding attends to itself only (a fully masked row gives NaN)
        spans["first"].append((list(range(p - 1, p + len(a) - 1)), a))
        spans["second"].append(([p - 1] + list(range(p + len(a), n - 1)), b))
    for key, pairs in spans.items():
        longest = max(len(t) for _, t in pairs)
        batch[f"{key}_src"] = torch.tensor([s + [-1] * (longest - len(s)) for s, _ in pairs])
        batch[f"{key}_tgt"] = torch.tensor([t + [-1] * (longest - len(t)) for _, t in pairs])
    zero, blocked = (
        torch.zeros((), dtype=mask_dtype),
        torch.tensor(torch.finfo(mask_dtype).min, dtype=mask_dtype),
    )
    batch["attention_mask"] = torch.where(allowed, zero, blocked)[:, None]
    for key in ("ref_first", "ref_second"):
        if key in examples[0]:
            batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float64)
    if "desirable" in examples[0]:
        batch["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in examples])
    return batch


def with_kl_completions(examples: Sequence[dict]) -> list[dict]:
    """KTO: give example i the completion of example i-1 (cyclically) as its KL completion, TRL's
    mismatched pairs (x_1, y_n), (x_2, y_1), ..., built within the batch given."""
    completions = [list(ex["input_ids"][ex["prompt_len"] :]) for ex in examples]
    return [{**ex, "kl_ids": completions[i - 1]} for i, ex in enumerate(examples)]


def report_preference(rs: Any, tokenizer: Any, max_length: int) -> int:
    """`lorakit data` for preference records: print the format, counts, lengths of prompt and
    completions, and what truncation and skipping did. Returns the exit status (0)."""
    import statistics

    fmt = preference_format(rs.records)
    enc = encode_preference(rs.records, tokenizer, fmt, max_length=max_length)
    skipped = f", {rs.skipped} malformed lines skipped" if rs.skipped else ""
    print(f"source:    {rs.source} ({len(rs.records)} records{skipped})")
    print(
        f"format:    {fmt} (columns: {', '.join(rs.columns)}; train with --method {'kto' if fmt == UNPAIRED else 'dpo, orpo or simpo'})"
    )
    parts = ("prompt_len", "chosen_len", "rejected_len") if fmt == PAIRS else ("prompt_len", "completion_len")
    for key in parts:
        lengths = sorted(ex[key] for ex in enc.examples)
        print(
            f"{key.removesuffix('_len') + ':':<10} tokens min {lengths[0]}, median {statistics.median(lengths):g}, max {lengths[-1]}"
        )
    if fmt == PAIRS:
        print(f"pairs:     {len(enc.examples)} kept, {enc.identical} skipped (chosen identical to rejected)")
    else:
        print(f"labels:    {enc.desirable} desirable, {enc.undesirable} undesirable")
    print(
        f"truncated: {enc.prompt_truncated} prompts cut from the left, {enc.completion_truncated} completions cut "
        f"(to fit {max_length} tokens per prompt + completion)"
    )
    return 0
