"""Datasets that ship with lorakit's dependencies, named where a data file is expected.

`read_dataset(ref)` reads a file (see `read_records`) or a built-in reference `NAME:SPLIT[:N]`:

- `rotten_tomatoes`: classification records {"text", "label": "positive" | "negative"};
- `rotten_tomatoes_chat`: the same reviews as a chat (a system message asking the question, the
  review cut to 400 characters so the answer is never truncated away, the label as the answer).
- `rotten_tomatoes_pref`: the same chats as preference pairs (the correct label chosen over the
  wrong one), for `lorakit train --method dpo|orpo|simpo`.

SPLIT is `train` (a seeded sample of the training pool) or `test` (the fixed held-out pool, in file
order); `[:N]` takes N records (all if left out). See `rotten_tomatoes`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError, DataError
from .readers import RecordSet, read_records
from .rotten_tomatoes import rotten_tomatoes

SENTIMENT_SYSTEM = "Is this movie review positive or negative?"
SENTIMENT_MAX_CHARS = 400
BUILTIN = ("rotten_tomatoes", "rotten_tomatoes_chat", "rotten_tomatoes_pref")
_REF = re.compile(r"^(?P<name>[a-z_]+):(?P<split>train|test)(?:\[:(?P<n>\d+)\])?$")


def read_dataset(
    ref: str | os.PathLike, *, on_error: str = "stop", split: str | None = None, seed: int = 0
) -> RecordSet:
    """Records of a data file, or of a built-in dataset reference (`seed` draws its train sample).

    Raises `DataError` for an unknown built-in name or a malformed reference (and what
    `read_records` and `rotten_tomatoes` raise)."""
    text = str(ref)
    m = _REF.match(text)
    if m is None or Path(text).exists():
        if text.split(":")[0] in BUILTIN and not Path(text).exists():
            raise DataError(f"{text}: a built-in dataset is named NAME:train[:N] or NAME:test[:N]")
        return read_records(ref, on_error=on_error, split=split)
    if m["name"] not in BUILTIN:
        raise DataError(f"{text}: no such file, and {m['name']!r} is not a built-in dataset {list(BUILTIN)}")
    n = None if m["n"] is None else int(m["n"])
    try:
        train, test = rotten_tomatoes(
            n if m["split"] == "train" else 0, n if m["split"] == "test" else 0, seed
        )
    except ConfigError as e:  # too many records asked for, or the package is missing: name the reference
        raise ConfigError(f"{text}: {e}") from None
    records = train if m["split"] == "train" else test
    if m["name"] == "rotten_tomatoes_chat":
        records = [sentiment_chat(r) for r in records]
    if m["name"] == "rotten_tomatoes_pref":
        records = [sentiment_pair(r) for r in records]
    return RecordSet(records=records, source=text)


def sentiment_chat(record: dict) -> dict:
    """A {"text", "label"} review as a chat record: the system question, the review, the label."""
    return {
        "messages": [
            {"role": "system", "content": SENTIMENT_SYSTEM},
            {"role": "user", "content": record["text"][:SENTIMENT_MAX_CHARS]},
            {"role": "assistant", "content": record["label"]},
        ]
    }


def sentiment_pair(record: dict) -> dict:
    """A {"text", "label"} review as a chat preference pair: the right label chosen over the other."""
    prompt = sentiment_chat(record)["messages"][:2]
    wrong = "negative" if record["label"] == "positive" else "positive"
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": record["label"]}],
        "rejected": [{"role": "assistant", "content": wrong}],
    }
