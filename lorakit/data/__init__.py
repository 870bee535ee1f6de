"""Training data: read files, detect formats, tokenize with loss masks, pack, split and collate.

Typical use::

    rs = read_dataset("train.jsonl", on_error="skip")     # or a built-in: "rotten_tomatoes:train[:500]"
    fmt = detect_format(rs.records)                 # or detect_format(rs.records, "chat")
    enc = encode(rs.records, tokenizer, fmt, max_length=512)
    train, evals = split(enc.examples, eval_fraction=0.1, seed=0)
    batch = collate(pack(train, 512)[:8], tokenizer.pad_token_id)
    loss = model(**batch).loss

This package may import pandas/pyarrow/datasets, always lazily inside functions.
"""

from ..tasks import IGNORE_INDEX
from .builtin import BUILTIN, read_dataset
from .collate import collate, pack, split
from .encode import Encoded, encode, uses_chat_template
from .formats import (
    FORMATS,
    build_label_map,
    build_tag_map,
    chat_messages,
    classification_as_instruction,
    detect_format,
    instruction_prompt,
    label_key,
    prompt_completion_messages,
    word_tags,
)
from .readers import RecordSet, read_records
from .rotten_tomatoes import rotten_tomatoes

__all__ = [
    "BUILTIN",
    "FORMATS",
    "IGNORE_INDEX",
    "Encoded",
    "RecordSet",
    "build_label_map",
    "chat_messages",
    "classification_as_instruction",
    "collate",
    "detect_format",
    "encode",
    "uses_chat_template",
    "instruction_prompt",
    "label_key",
    "pack",
    "read_dataset",
    "read_records",
    "rotten_tomatoes",
    "split",
    "build_tag_map",
    "prompt_completion_messages",
    "word_tags",
]
