"""`lorakit` command line: a table of subcommands, parsing only.

Each subcommand is a module `lorakit/commands/<command>.py` exposing `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs,
so `lorakit --help` stays fast and a command's heavy imports never slow the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import LorakitError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tour": (
        "lorakit.commands.tour",
        "inject, train, save, load and merge LoRA on the embedded model (a quick tour)",
    ),
    "generate": (
        "lorakit.commands.generate",
        "generate text with a model and adapters, streaming to the terminal",
    ),
    "export": (
        "lorakit.commands.export",
        "merge adapters into the base and write it for other tools (--format hf: a plain HF folder)",
    ),
    "serve": ("lorakit.commands.serve", "OpenAI-compatible server: one base model, many adapters, batched"),
    "data": ("lorakit.commands.data", "check a dataset: format, counts, token lengths, what the loss covers"),
    "train": (
        "lorakit.commands.train",
        "train a LoRA adapter (no arguments: the packaged sentiment config, lorakit/configs/sentiment.yaml)",
    ),
    "plan": (
        "lorakit.commands.plan",
        "parameters, file sizes and training memory of full / LoRA / QLoRA; fit a budget",
    ),
}
# other names of a command: shown in the help (`merge` is `export --format hf`)
ALIASES: dict[str, list[str]] = {"export": ["merge"]}
# old names still accepted, not shown: `lorakit demo` was the tour
HIDDEN_ALIASES: dict[str, str] = {"demo": "tour"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        aliases = ALIASES.get(name, [])
        p = sub.add_parser(name, help=help_text, description=help_text, aliases=aliases)
        p.set_defaults(_module=module)
        if command == name or command in aliases:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in HIDDEN_ALIASES:
        i = argv.index(command)
        command = HIDDEN_ALIASES[command]
        argv = [*argv[:i], command, *argv[i + 1 :]]
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    if not args.command:
        build_parser().print_help()
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except LorakitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
