"""`lorakit serve --model M --adapter name=DIR ... [--adapter-dir DIR] [--api-key KEY]`.

Every setting is checked before the model is loaded, so a bad flag fails in a second."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import ConfigError
from ..hf import DEFAULT_MODEL
from ..serve.cache import check_name

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `lorakit serve`."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"HF folder, .gguf file, Hub ID (org/name) or {DEFAULT_MODEL}"
    )
    parser.add_argument("--served-model-name", default=None, help="the base model's id (default: its name)")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="DIR or Hub ID; repeatable"
    )
    parser.add_argument("--adapter-dir", default=None, help="folder of adapters loadable by name at run time")
    parser.add_argument("--max-loaded", type=int, default=8, help="adapters kept in memory at once (LRU)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $LORAKIT_API_KEY)"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests per batched forward")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="how long to wait for a batch to fill"
    )
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=1024, help="the most tokens a request may ask for")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000)
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive (else 408)",
    )
    parser.add_argument(
        "--batching",
        choices=["continuous", "static"],
        default="continuous",
        help="continuous: rows join and leave at every decoding step; static: whole batches",
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="prompt + max_tokens of all rows in flight"
    )
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    parser.add_argument(
        "--max-queue-per-adapter", type=int, default=None, help="waiting requests per adapter before 429"
    )
    parser.add_argument(
        "--max-loaded-bytes",
        type=int,
        default=None,
        help="memory limit of loaded adapters: their parameters and the copy mixed batches stack (about 2x the files)",
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on shutdown"
    )


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`["name=DIR", ...]` -> {name: DIR}; raises `ConfigError` for a spec without a name or a repeat."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        check_name(name)
        out[name] = Path(folder)
    return out


def build(args: argparse.Namespace):
    """The FastAPI app for `args` (model and adapters loaded)."""
    from .. import hf
    from ..io import adapter_source
    from ..serve import AdapterCache, Engine, Limits, create_app

    adapters = parse_adapters(args.adapter)
    limits = Limits(args.max_prompt_tokens, args.max_tokens, args.max_body_bytes, args.body_timeout)
    engine_args = (
        args.max_batch,
        args.batch_wait_ms,
        args.max_queue,
        args.batching,
        args.max_batch_tokens,
        args.prefill_chunk,
    )
    Engine.check_settings(*engine_args)  # before the slow load
    if args.max_loaded < 1:
        raise ConfigError(f"--max-loaded must be at least 1, got {args.max_loaded}")
    if args.max_queue_per_adapter is not None and args.max_queue_per_adapter < 1:
        raise ConfigError(f"--max-queue-per-adapter must be at least 1, got {args.max_queue_per_adapter}")
    if args.max_loaded_bytes is not None and args.max_loaded_bytes < 1:
        raise ConfigError(f"--max-loaded-bytes must be at least 1, got {args.max_loaded_bytes}")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise ConfigError(f"--shutdown-timeout must be a finite number >= 0, got {args.shutdown_timeout}")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    from ..generate import inference_task
    from ..tasks import SEQ2SEQ

    if inference_task(args.model) == SEQ2SEQ:  # before the slow load
        raise ConfigError(
            f"{args.model} is an encoder-decoder (seq2seq) model; lorakit serve serves causal LMs only "
            "(its batching decodes one growing sequence per request). Generate with "
            "`lorakit generate --model MODEL --adapter ADAPTER PROMPT`, which handles seq2seq models"
        )
    model, tokenizer = hf.load_model(args.model)
    adapters = {name: adapter_source(folder) for name, folder in adapters.items()}  # or Hub IDs
    base_name = args.served_model_name or Path(str(args.model)).name
    cache = AdapterCache(model, adapters, args.adapter_dir, args.max_loaded, args.max_loaded_bytes)
    if base_name in cache:
        raise ConfigError(
            f"adapter name {base_name!r} is the base model's id; rename it or set --served-model-name"
        )
    cache.ensure(list(adapters)[: args.max_loaded])  # fail at start, not at the first request
    engine = Engine(model, tokenizer, cache, *engine_args, args.max_queue_per_adapter)
    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY")
    return create_app(engine, base_name, api_key, limits, args.shutdown_timeout), api_key


def run(args: argparse.Namespace) -> int:
    """Load everything, then serve until interrupted."""
    import uvicorn

    app, api_key = build(args)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    # uvicorn stops accepting on SIGINT/SIGTERM and gives open requests the same deadline
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)),
    )
    return 0
