"""`lorakit export` (alias `lorakit merge`): merge adapters into their base model and write it for
another tool. `--format hf` (the default and, for now, the only one) writes a plain Hugging Face
folder that transformers loads alone (`lorakit.export.hf`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..export import FORMATS
from ..export.hf import DTYPES, check_output
from ..hf import DEFAULT_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `lorakit export`."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"HF folder, .gguf file, Hub ID (org/name) or {DEFAULT_MODEL}"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="DIR",
        help="adapter folder or Hub ID (repeatable; summed)",
    )
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default="hf", help="hf: a merged Hugging Face folder (default)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the model's dtype")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def run(args: argparse.Namespace) -> int:
    """Load the model and adapters, merge, write `--output`; print how to load it."""
    from ..adapters import set_adapter
    from ..generate import load_for_inference

    output = Path(args.output)
    check_output(output, args.overwrite)  # before the (slow) model load
    model, tokenizer, adapter = load_for_inference(args.model, args.adapter)
    set_adapter(model, adapter)
    FORMATS[args.format](model, tokenizer, output, args.dtype, args.max_shard_size, args.overwrite)
    print(f"wrote {output}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(output)!r})")
    return 0
