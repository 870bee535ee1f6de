"""`lorakit data FILE`: check a dataset before training and show what the model will learn.

Reads the file as `lorakit train` would, then prints its format, counts (records, skipped lines,
truncated and dropped sequences), token lengths, the share of tokens that carry the loss, what
packing would give, and the first examples with the learned tokens marked [[like this]].
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from ..data.builtin import read_dataset
from ..data.collate import pack
from ..data.encode import encode
from ..data.formats import FORMATS, build_label_map, build_tag_map, detect_format
from ..data.preference import preference_format, report_preference
from ..data.readers import ON_ERROR
from ..hf import DEFAULT_MODEL
from ..tasks import CAUSAL_LM, IGNORE_INDEX, TASKS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lorakit data`."""
    parser.add_argument(
        "path",
        help="dataset: .jsonl/.json/.csv/.tsv/.parquet (.gz/.bz2), a save_to_disk folder, or a built-in "
        "dataset such as rotten_tomatoes:train[:100]",
    )
    parser.add_argument("--format", choices=FORMATS, help="data format (default: detected from the columns)")
    parser.add_argument(
        "--task", choices=TASKS, default=CAUSAL_LM, help="what the data trains (default causal-lm)"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model whose tokenizer to use (default {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--max-length", type=_at_least(2), default=512, help="token limit per sequence (default 512)"
    )
    parser.add_argument(
        "--on-error", choices=ON_ERROR, default="stop", help="on a malformed line: stop or skip it"
    )
    parser.add_argument("--split", help="split of a saved DatasetDict folder (default train)")
    parser.add_argument(
        "--show", type=_at_least(0), default=1, metavar="N", help="print the first N examples (default 1)"
    )
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="render prompt/completion text records with the chat template (as lorakit train --chat-template)",
    )


def _at_least(low: int):
    """An argparse type: an integer >= `low` (argparse reports anything else as a usage error)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def run(args: argparse.Namespace) -> int:
    """Read, check and encode the dataset; print the report. Bad data raises `DataError` (exit 1)."""
    from ..hf import load_tokenizer

    rs = read_dataset(args.path, on_error=args.on_error, split=args.split)
    if preference_format(rs.records) and args.format is None:
        return report_preference(rs, load_tokenizer(args.model), args.max_length)
    fmt = detect_format(rs.records, args.format)
    tokenizer = load_tokenizer(args.model)
    label_map = build_label_map(rs.records) if fmt == "classification" else None
    if fmt == "token-tags":
        label_map = build_tag_map(rs.records)
    enc = encode(
        rs.records,
        tokenizer,
        fmt,
        max_length=args.max_length,
        label_map=label_map,
        task=args.task,
        chat_template=args.chat_template,
    )
    skipped = f", {rs.skipped} malformed lines skipped" if rs.skipped else ""
    print(f"source:    {rs.source} ({len(rs.records)} records{skipped})")
    print(f"format:    {fmt} (columns: {', '.join(rs.columns)})")
    if label_map:
        print(
            f"{'tags:' if fmt == 'token-tags' else 'labels:':<10} {', '.join(f'{k}={v}' for k, v in label_map.items())}"
        )
    for key, value in summarize(enc.examples, args.max_length).items():
        print(f"{key + ':':<10} {value}")
    print(
        f"truncated: {enc.truncated} longer than {args.max_length} tokens; dropped: {enc.dropped} with nothing to learn"
    )
    for ex in enc.examples[: args.show]:
        print("-" * 60)
        print(show_example(ex, tokenizer, label_map))
    return 0


def summarize(examples: list[dict[str, Any]], max_length: int) -> dict[str, str]:
    """Token length statistics, the share of tokens that carry the loss, and what packing would give."""
    lengths = sorted(len(ex["input_ids"]) for ex in examples)
    total = sum(lengths)
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    out = {
        "examples": f"{len(examples)}, {total} tokens",
        "lengths": f"min {lengths[0]}, median {statistics.median(lengths):g}, p95 {p95}, max {lengths[-1]}",
    }
    if examples and "target_ids" in examples[0]:
        targets = sorted(len(ex["target_ids"]) for ex in examples)
        out["targets"] = (
            f"{sum(targets)} tokens; lengths min {targets[0]}, median {statistics.median(targets):g}, max {targets[-1]}"
        )
    if examples and "token_labels" in examples[0]:
        tagged = sum(1 for ex in examples for t in ex["token_labels"] if t != IGNORE_INDEX)
        out["learned"] = f"{tagged} tokens ({tagged / total:.0%}) carry a tag (each word's first sub-token)"
    if examples and "labels" in examples[0]:
        learned = sum(1 for ex in examples for t in ex["labels"][1:] if t != IGNORE_INDEX)
        out["learned"] = f"{learned} tokens ({learned / total:.0%}) carry the loss"
        packed = pack(examples, max_length)
        out["packing"] = (
            f"{len(examples)} examples -> {len(packed)} sequences of <= {max_length} tokens "
            f"({total / (len(packed) * max_length):.0%} full)"
        )
    return out


def show_example(example: dict[str, Any], tokenizer: Any, label_map: dict[str, int] | None = None) -> str:
    """The example's text with the tokens that carry the loss wrapped in [[ ]]."""
    names = {v: k for k, v in (label_map or {}).items()}
    if "label" in example:
        return f"{tokenizer.decode(example['input_ids'])}\n=> label {names.get(example['label'], example['label'])}"
    if "target_ids" in example:
        return f"{tokenizer.decode(example['input_ids'])}\n=> target [[{tokenizer.decode(example['target_ids'])}]]"
    if "token_labels" in example:  # each word's first sub-token with its tag
        return " ".join(
            tokenizer.decode([t]) + (f"/{names.get(tag, tag)}" if tag != IGNORE_INDEX else "")
            for t, tag in zip(example["input_ids"], example["token_labels"])
        )
    parts, run, learned = [], [], False
    for token, label in zip(example["input_ids"], example["labels"]):
        if (label != IGNORE_INDEX) != learned and run:
            parts.append(f"[[{tokenizer.decode(run)}]]" if learned else tokenizer.decode(run))
            run = []
        learned = label != IGNORE_INDEX
        run.append(token)
    if run:
        parts.append(f"[[{tokenizer.decode(run)}]]" if learned else tokenizer.decode(run))
    return "".join(parts)
