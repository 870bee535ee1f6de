"""Merge LoRA adapters into a 4-bit base.

    merge_to_dense(model, dtype=torch.float32) -> model
        The correct procedure: for each LoRA layer on a `Linear4bit`, W = dequantize(W4) + sum of
        the active adapters' deltas, stored as a plain `nn.Linear` in `dtype`; other 4-bit layers
        are dequantized too (`dequantize_rest`), other LoRA layers merged as usual. The result is
        an ordinary full-precision model, equal to the QLoRA model up to float rounding.

    merge_requantized(model) -> model
        Same merge, but each merged weight is quantized back to NF4 (a `Linear4bit`), keeping the
        model small at the price of a second rounding of every weight.

    requantization_error(model, inputs) -> {"max_abs_diff": ..., "mean_abs_diff": ...}
        How far the re-quantized merge's outputs (logits) are from the exact merge's, on `inputs`.

All three work on copies or in place as documented; none needs transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .. import _state
from ..layers import LoraLayer
from ..merge import unload
from ..modeling import replace_module
from .linear4bit import Linear4bit
from .nf4 import quantize_nf4


def _merged_weight(wrapper: LoraLayer) -> torch.Tensor:
    """fp32 dequantized base weight plus every active, not-yet-merged adapter's delta."""
    base: Linear4bit = wrapper.base_layer
    w = base.dequantize(torch.float32)
    for name in wrapper.active_adapters:
        if name not in wrapper.merged_adapters:  # merged ones are already inside the 4-bit weight
            w += wrapper.delta_weight(name).to(w.device, torch.float32)
    return w


def _merge_4bit(model: nn.Module, build) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, Linear4bit):
            replace_module(model, name, build(module.base_layer, _merged_weight(module)))
    if any(isinstance(m, LoraLayer) for m in model.modules()) or _state.has_adapters(model):
        unload(model, merge=True)  # the remaining (full-precision) LoRA layers, configs, modules_to_save


def merge_to_dense(
    model: nn.Module, dtype: torch.dtype = torch.float32, dequantize_rest: bool = True
) -> nn.Module:
    """Merge the active adapters exactly: 4-bit bases become full-precision `nn.Linear` (in place)."""

    def dense(base: Linear4bit, w: torch.Tensor) -> nn.Linear:
        linear = base.to_linear(dtype)
        linear.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        return linear

    _merge_4bit(model, dense)
    if dequantize_rest:
        for name, module in list(model.named_modules()):
            if isinstance(module, Linear4bit):
                replace_module(model, name, module.to_linear(dtype))
    return model


def merge_requantized(model: nn.Module) -> nn.Module:
    """Merge the active adapters and re-quantize each merged weight to NF4 (in place; lossy)."""

    def requantize(base: Linear4bit, w: torch.Tensor) -> Linear4bit:
        packed, state = quantize_nf4(w.to(base.weight_dtype), base.blocksize, base.double_quant)
        return Linear4bit.from_quantized(packed, state, base.bias, base.compute_dtype)

    _merge_4bit(model, requantize)
    return model


def _logits(out) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def requantization_error(model: nn.Module, inputs: Iterable[torch.Tensor] | torch.Tensor) -> dict[str, float]:
    """Max and mean absolute difference of the outputs (logits) of the re-quantized merge vs the
    exact merge of `model`'s active adapters, over `inputs` (tensors passed as the first argument,
    e.g. token ids). `model` itself is not changed (both merges run on copies)."""
    exact = merge_to_dense(copy.deepcopy(model), torch.float32)
    requant = merge_requantized(copy.deepcopy(model))
    exact.eval()
    requant.eval()
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    max_diff, total, count = 0.0, 0.0, 0
    for x in batches:
        diff = (_logits(exact(x)).float() - _logits(requant(x)).float()).abs()
        max_diff = max(max_diff, diff.max().item())
        total += diff.sum().item()
        count += diff.numel()
    return {"max_abs_diff": max_diff, "mean_abs_diff": total / max(count, 1)}
