"""The merged model's tensors, one at a time, without changing the model.

`merged_tensors(model)` yields `(name, tensor)` in the names of the plain model's state dict
(`model.layers.0.self_attn.q_proj.weight`), each weight with the active adapters already folded in:
`W + sum(delta_weight)`, computed in fp32 for that layer only. A 4-bit (QLoRA) base is dequantized
first, so the merge is exact and nothing is re-quantized to NF4. Only one merged layer exists at a
time, which is what lets the GGUF writer stream: peak memory is the model plus one layer.

A weight shared by two modules (tied input/output embeddings) is yielded once, unless an adapter
changes one of them: then each gets its own merged copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..layers import LoraLayer, ModulesToSave
from ..quant.linear4bit import Linear4bit


def has_4bit(model: nn.Module) -> bool:
    """Whether any layer of `model` holds a 4-bit (NF4) weight."""
    return any(isinstance(m, Linear4bit) for m in model.modules())


def _base_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, Linear4bit):
        return layer.dequantize(torch.float32)
    return layer.weight.detach().float()


def _adapters_to_add(layer: LoraLayer) -> list[str]:
    """Active adapters not yet inside the base weight (merged ones already are)."""
    if layer.disabled:
        return []
    return [a for a in layer.active_adapters if a in layer.r and a not in layer.merged_adapters]


def _merged(layer: LoraLayer) -> torch.Tensor:
    base = layer.base_layer
    w = _base_weight(base)
    with torch.no_grad():
        for adapter in _adapters_to_add(layer):
            w = w + layer.delta_weight(adapter).detach().to(w.device, torch.float32)
    return w


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(state-dict name, tensor)` of `model` with its active adapters merged (fp32 for
    merged and dequantized weights, the stored dtype for the rest). `model` is not changed."""
    seen: dict[int, bool] = {}  # id of a base weight -> whether its first owner was adapted

    def first_time(tensor, adapted: bool) -> bool:
        if id(tensor) in seen and not (adapted or seen[id(tensor)]):
            return False  # a tied weight, unchanged by any adapter: once is enough
        seen.setdefault(id(tensor), adapted)
        return True

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(module, ModulesToSave):
            yield from walk(module.current(), prefix)
            return
        if isinstance(module, LoraLayer):
            base = module.base_layer
            if first_time(base.weight, bool(_adapters_to_add(module))):
                yield prefix + "weight", _merged(module)
            if getattr(base, "bias", None) is not None:
                yield prefix + "bias", base.bias.detach()
            return
        if isinstance(module, Linear4bit):
            yield prefix + "weight", module.dequantize(torch.float32)
            if module.bias is not None:
                yield prefix + "bias", module.bias.detach()
            return
        for key, t in _own_tensors(module):
            if first_time(t, False):
                yield prefix + key, t.detach()
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    with torch.no_grad():
        yield from walk(model, "")


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A module's direct parameters and persistent buffers (not its children's)."""
    yield from module.named_parameters(recurse=False)
    skip = getattr(module, "_non_persistent_buffers_set", set())
    for key, b in module.named_buffers(recurse=False):
        if key not in skip:
            yield key, b
