"""Merged export: fold adapters into the base and write a plain Hugging Face model folder.

The folder (config, safetensors shards, generation config, tokenizer) loads with
`transformers.AutoModelForCausalLM.from_pretrained(folder)` alone: no lorakit, no PEFT, and no
inference overhead, since the adapters are part of the weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .._atomic import atomic_folder, clean_stale
from ..errors import ConfigError, storage_errors
from ..inject import lora_layers
from ..merge import unload
from ..modeling import tied_embeddings
from ..quant.merging import merge_to_dense
from .tensors import has_4bit

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_hf(
    model: nn.Module,
    tokenizer,
    output: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Merge the active adapters into `model`, cast to `dtype` ("fp16", "bf16", "fp32"; None keeps the
    model's), and write it with `tokenizer` to `output`. `model` is left unloaded (plain, merged).

    The folder is built beside `output` and swapped in whole (`lorakit._atomic.atomic_folder`), so
    a failure or a kill leaves any previous `output` intact. Tied input/output embeddings are untied first when an adapter
    changes one of them (merging into a shared matrix would change both).
    Raises `ConfigError` for an unknown dtype, an `output` that is a file, or one that exists and
    is not empty (unless `overwrite`); `StorageError` when the disk is full or not writable.
    A 4-bit (QLoRA) base is merged exactly into its dequantized weights (`merge_to_dense`), in
    `dtype` or else the dtype of the model's other parameters; it is never re-quantized to NF4.
    """
    output = Path(output)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_output(output, overwrite)
    _untie_if_adapted(model)
    if has_4bit(model):  # QLoRA: merge into the dequantized weights, never re-quantize to NF4
        merge_to_dense(model, DTYPES[dtype] if dtype else _float_dtype(model))
    else:
        unload(model, merge=True)
    if dtype is not None:
        model.to(DTYPES[dtype])
    clean_stale(output.parent)  # what a killed export left beside `output`
    with storage_errors(output), atomic_folder(output) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    log.info("wrote the merged model to %s", output)
    return output


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's full-precision parameters (what a 4-bit base dequantizes to)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def check_output(output: Path, overwrite: bool) -> None:
    """Raise `ConfigError` unless `output` can be written: a file never, a non-empty folder only
    with `overwrite`."""
    if output.is_file() or (output.exists() and not output.is_dir()):
        raise ConfigError(f"--output {output} is a file; remove it or choose another --output")
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
