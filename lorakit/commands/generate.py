"""`lorakit generate [--model M] [--adapter [NAME=]DIR ...] PROMPT`: stream a reply to the terminal."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..hf import DEFAULT_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `lorakit generate`."""
    parser.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"HF folder, .gguf file, Hub ID (org/name) or {DEFAULT_MODEL}"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="adapter folder or Hub ID (repeatable; several are summed)",
    )
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="a system message (chat models)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")


def read_prompt(prompt: str) -> str:
    """`prompt`, or standard input for '-'; raises `ConfigError` for input that is not UTF-8."""
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"the prompt on standard input is not UTF-8 text (byte {e.start}); convert it first"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Load the model and adapters, stream the reply to standard output."""
    from ..generate import Sampling, generate_text, load_for_inference

    sampling = Sampling(args.max_tokens, args.temperature, args.top_p, args.seed)  # checked before the load
    if args.system and args.raw:
        raise ConfigError("--system needs the chat template, which --raw turns off; drop one of them")
    prompt = read_prompt(args.prompt)
    model, tokenizer, adapter = load_for_inference(args.model, args.adapter)
    if args.system:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": prompt}]

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate_text(model, tokenizer, prompt, adapter, sampling, chat=not args.raw, on_text=show)
    sys.stdout.write("\n")
    return 0
