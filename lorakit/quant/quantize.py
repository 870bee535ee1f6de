"""What QLoRA stores in 4-bit, and putting an in-memory model's linear layers in NF4.

The one statement of the rule, used by `quantize_model`, by `load_quantized` (hf_loading.py) and
by `lorakit.plan` (so the planner cannot drift from what is really quantized):

- every `nn.Linear` is stored in NF4, in blocks of `DEFAULT_BLOCKSIZE` with double-quantized
  scales (blocks of `NESTED_BLOCKSIZE`);
- except the modules named in `skip_modules` (default `DEFAULT_SKIP`, the output heads), matched
  by `is_skipped`, and any linear layer whose weight is tied to an embedding (so tying keeps
  working); embeddings and norms are not `nn.Linear` and stay in full precision;
- LoRA's own matrices (inside `lora_*` containers) and `modules_to_save` copies train, so they are
  never quantized: on a model that already has adapters, only the frozen base layers count.

    quantized_weights(model, skip_modules=DEFAULT_SKIP) -> [module names]
    should_quantize(name, module, skip_modules=DEFAULT_SKIP, tied=frozenset()) -> bool
    quantize_model(model, skip_modules=DEFAULT_SKIP, compute_dtype=None, blocksize=64,
                   double_quant=True, after_layer=None) -> model
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable

import torch
from torch import nn

from ..errors import QuantizationError
from ..modeling import HEAD_NAMES, replace_module, tied_heads
from .linear4bit import Linear4bit
from .nf4 import NESTED_BLOCKSIZE

log = logging.getLogger(__name__)

DEFAULT_SKIP = HEAD_NAMES  # the output heads
DEFAULT_BLOCKSIZE = 64
__all__ = [
    "DEFAULT_BLOCKSIZE",
    "DEFAULT_SKIP",
    "NESTED_BLOCKSIZE",
    "is_skipped",
    "quantize_model",
    "quantized_weights",
    "should_quantize",
]


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """A module is skipped if a skip entry is its full name, its last dotted part(s), or a parent."""
    return any(
        name == s or name.endswith("." + s) or name.startswith(s + ".") or f".{s}." in name for s in skip
    )


def should_quantize(
    name: str, module: nn.Module, skip_modules: Iterable[str] = DEFAULT_SKIP, tied: Collection[str] = ()
) -> bool:
    """Whether QLoRA stores `module` (called `name` in its model) in NF4; `tied` are the model's
    `tied_heads`. See the module docstring for the rule."""
    return (
        isinstance(module, nn.Linear)
        and bool(name)
        and name not in tied
        and not is_skipped(name, skip_modules)
    )


def _trained_copy(name: str) -> bool:
    # LoRA's A/B live in `lora_*` containers, full copies in `modules_to_save` (layers/ naming)
    return any(part.startswith("lora_") or part == "modules_to_save" for part in name.split("."))


def quantized_weights(model: nn.Module, skip_modules: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the linear layers of `model` that QLoRA stores in NF4 (see the module docstring).

    Works on a plain model and on one with LoRA already injected (its frozen `base_layer`s count,
    the adapters' own matrices do not); layers already in 4-bit are not listed.
    """
    skip = tuple(skip_modules)
    tied = tied_heads(model)
    return [n for n, m in model.named_modules() if should_quantize(n, m, skip, tied) and not _trained_copy(n)]


def _check_quantizable(model: nn.Module) -> None:
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise QuantizationError(
            "the model already has 4-bit (Linear4bit) layers; quantize the original full-precision model instead"
        )
    if any(hasattr(m, "base_layer") and hasattr(m, "lora_A") for m in model.modules()):
        raise QuantizationError(
            "the model already has LoRA layers; quantize the base model first, then inject the adapter"
        )


def quantize_model(
    model: nn.Module,
    skip_modules: Iterable[str] = DEFAULT_SKIP,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    after_layer: Callable[[], None] | None = None,
) -> nn.Module:
    """Replace the `nn.Linear` layers of `model` by `Linear4bit`, one at a time, in place; returns
    `model`. Each full-precision weight is freed as soon as its layer is quantized.

    `compute_dtype` defaults to each weight's dtype. `after_layer` is called after each layer
    (e.g. `lorakit._heap.release_freed_memory`, to hand the freed weight back to the OS at once).
    Raises `QuantizationError` if the model is already quantized or already has LoRA layers
    (quantize first, then inject).
    """
    _check_quantizable(model)
    names = quantized_weights(model, skip_modules)
    for name in names:
        layer = Linear4bit.from_linear(model.get_submodule(name), compute_dtype, blocksize, double_quant)
        replace_module(model, name, layer)
        if after_layer is not None:
            after_layer()
    log.info("quantized %d linear layers to NF4", len(names))
    return model
