"""Merged export: fold adapters into the base and write a plain Hugging Face model folder.

The folder (config, safetensors shards, generation config, tokenizer) loads with
`transformers.AutoModelForCausalLM.from_pretrained(folder)` alone: no lorakit, no PEFT, and no
inference overhead, since the adapters are part of the weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .adapters import set_adapter
from .errors import ConfigError
from .inject import lora_layers
from .merge import unload
from .modeling import tied_embeddings

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_merged(
    model: nn.Module,
    tokenizer,
    output: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Merge the active adapters into `model`, cast to `dtype` ("fp16", "bf16", "fp32"; None keeps the
    model's), and write it with `tokenizer` to `output`. `model` is left unloaded (plain, merged).

    The folder is written beside `output` and renamed into place at the end, so a failure leaves
    any previous `output` intact. Tied input/output embeddings are untied first when an adapter
    changes one of them (merging into a shared matrix would change both).
    Raises `ConfigError` for an unknown dtype, or when `output` exists and is not empty (unless
    `overwrite`).
    """
    output = Path(output)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_output(output, overwrite)
    _untie_if_adapted(model)
    unload(model, merge=True)
    if dtype is not None:
        model.to(DTYPES[dtype])
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the merged model to %s", output)
    return output


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConfigError(
            f"{output} already exists and is not empty; choose another --output or pass --overwrite"
        )


def _untie_if_adapted(model: nn.Module) -> None:
    """Give the output head its own weight if it shares the embedding's and an adapter touches either."""
    tied = tied_embeddings(model)
    if tied is None:
        return
    emb, head = tied
    head_w = getattr(head, "base_layer", head).weight
    adapted = {id(m) for _, m in lora_layers(model) if m.r}
    if id(emb) in adapted or id(head) in adapted:
        getattr(head, "base_layer", head).weight = nn.Parameter(head_w.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        text_config = getattr(model.config, "get_text_config", lambda: None)()
        if text_config is not None:
            text_config.tie_word_embeddings = False


# command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or smollm2-135m")
    parser.add_argument(
        "--adapter", action="append", required=True, metavar="DIR", help="adapter folder (repeatable; summed)"
    )
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the model's dtype")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def run(args: argparse.Namespace) -> int:
    from .generate import load_for_inference

    output = Path(args.output)
    _check_output(output, args.overwrite)  # before the (slow) model load
    model, tokenizer, adapter = load_for_inference(args.model, args.adapter)
    set_adapter(model, adapter)
    export_merged(model, tokenizer, output, args.dtype, args.max_shard_size, args.overwrite)
    print(f"wrote {output}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(output)!r})")
    return 0
