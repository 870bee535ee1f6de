"""Merge adapters into the base weights (zero inference overhead), unmerge, and unload the wrappers.

A merged adapter is frozen until it is unmerged, and unmerging subtracts exactly the weights that
were merged (see `lorakit.layers.base`), so training or editing it in between cannot corrupt the
base. Merging is all or nothing: a non-finite adapter is refused before any weight changes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import _state
from .errors import AdapterStateError, ConfigError, LorakitError
from .inject import inject, lora_layers
from .layers import LoraLayer, ModulesToSave
from .modeling import parameter_names, replace_module


def merge(model: nn.Module, adapters: str | list[str] | None = None) -> nn.Module:
    """Add `adapters` (default: the active ones) into the base weights. The forward then skips them.

    Raises `AdapterStateError` for an unknown adapter name, a tied (shared) adapted weight, or an
    adapter with non-finite (NaN/Inf) weights; then no weight has changed.
    """
    names = _state.active(model) if adapters is None else _state.as_names(adapters)
    _check_known(model, names)
    _check_untied(model)
    _merge_layers(model, names)
    return model


def _merge_layers(model: nn.Module, names: list[str]) -> None:
    """Merge `names` into every LoRA layer, undoing the layers already merged if one fails."""
    _check_finite(model, names)
    done: list[tuple[LoraLayer, list[str]]] = []
    try:
        for layer_name, layer in lora_layers(model):
            before = set(layer.merged_adapters)
            try:
                layer.merge(names)
            except LorakitError as e:
                raise AdapterStateError(f"cannot merge into {layer_name}: {e}") from None
            done.append((layer, [n for n in layer.merged_adapters if n not in before]))
    except BaseException:
        for layer, added in reversed(done):
            layer.unmerge(added)
        raise


def _check_finite(model: nn.Module, names: list[str]) -> None:
    """Refuse, before any weight changes, an adapter whose weights or delta are NaN/Inf (the delta
    is computed once here: a merge is rare, a non-finite base weight is forever)."""
    for layer_name, layer in lora_layers(model):
        for adapter in names:
            if adapter not in layer.r or adapter in layer.merged_adapters:
                continue
            for container in layer.adapter_containers:
                for key, t in _tensors(getattr(layer, container)[adapter]):
                    if not bool(torch.isfinite(t).all()):
                        raise AdapterStateError(
                            f"cannot merge adapter {adapter!r}: {layer_name}.{container}.{adapter}{key} holds "
                            "NaN/Inf values, which would make the base weights non-finite. Retrain or reload it"
                        )
            with torch.no_grad():
                finite = bool(torch.isfinite(layer.delta_weight(adapter)).all())
            if not finite:
                raise AdapterStateError(
                    f"cannot merge adapter {adapter!r}: its delta for {layer_name} overflows to non-finite "
                    "values (the weights are finite but their product is not). Retrain or reload it"
                )


def _tensors(item: nn.Module | nn.Parameter) -> list[tuple[str, torch.Tensor]]:
    if isinstance(item, nn.Parameter):
        return [("", item)]
    return [(f".{k}", t) for k, t in item.state_dict(keep_vars=True).items()]


def _check_known(model: nn.Module, names: list[str]) -> None:
    known = _state.names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterStateError(f"cannot merge unknown adapter(s) {unknown}; the model has {known}")


def _check_untied(model: nn.Module) -> None:
    """Refuse to merge into a weight another module shares (a tied embedding / LM head): the merge
    would change both, while the unmerged adapter changes only one."""
    owners = parameter_names(model)
    for _, module in lora_layers(model):
        if module.active_adapters:
            weight = getattr(module.base_layer, "weight", None)
            shared = owners.get(id(weight), [])
            if len(shared) > 1:
                raise AdapterStateError(
                    f"cannot merge: the adapted weight is shared by {shared} (tied embeddings), so merging would "
                    "change all of them. Untie the weights first (clone the output head's weight), or keep the "
                    "adapter unmerged"
                )


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights (exactly the weights that were merged),
    restoring them to within float rounding; the adapters become trainable again if active."""
    for _, module in lora_layers(model):
        module.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every wrapper, returning the plain model (same object and class as before injection).

    With `merge` the active adapters are merged first, and `modules_to_save` modules keep the active
    adapter's trained copy; without it the original weights and modules come back.
    """
    if merge:
        _check_untied(model)
        _merge_layers(model, _state.active(model))
    else:
        unmerge(model)
    for name, module in reversed(list(model.named_modules())):  # inner (nested) wrappers first
        if isinstance(module, LoraLayer):
            replace_module(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            replace_module(model, name, module.unloaded(merge))
    _state.clear(model)
    return model


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "linear",
) -> nn.Module:
    """Add adapter `adapter_name`, a weighted combination of `adapters` (PEFT's `add_weighted_adapter`).

    - "linear": A = sum(sign_i * sqrt(|w_i * s_i|) * A_i), B = sum(sqrt(|w_i * s_i|) * B_i), where s_i
      is adapter i's scaling; all adapters need the same rank. A rough, cheap approximation.
    - "cat": A = concat(w_i * s_i * A_i), B = concat(B_i): the delta is exactly sum(w_i * delta_i);
      the rank is the sum of the ranks.
    The new adapter has r = lora_alpha = that rank (so its scaling is 1, as in PEFT), adapts every
    module any source adapter adapts, and is not activated. A single adapter always uses "linear".
    Raises `AdapterStateError` for an unknown or existing name, `ConfigError` for a bad
    combination type, mismatched weights, ranks that "linear" cannot combine, or `modules_to_save`.
    """
    configs = _state.configs(model)
    adapters = _state.as_names(adapters)
    _state.check_name(adapter_name)
    _check_known(model, adapters)
    if adapter_name in configs:
        raise AdapterStateError(f"model already has an adapter named {adapter_name!r}; pick another name")
    if not isinstance(weights, (list, tuple)) or not all(
        isinstance(w, (int, float)) and math.isfinite(w) for w in weights
    ):
        raise ConfigError(f"add_weighted_adapter weights must be finite numbers, got {weights}")
    if len(weights) != len(adapters) or not adapters:
        raise ConfigError(
            f"add_weighted_adapter needs one weight per adapter, got {len(weights)} for {adapters}"
        )
    if combination_type not in ("linear", "cat"):
        raise ConfigError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}")
    if any(configs[a].modules_to_save for a in adapters):
        raise ConfigError(
            "add_weighted_adapter cannot combine adapters with modules_to_save (full module copies)"
        )
    if any(configs[a].lora_bias for a in adapters):
        raise ConfigError(
            "add_weighted_adapter cannot combine adapters with lora_bias=True (a bias on lora_B); "
            "merge them into the base one by one instead (lorakit.merge)"
        )
    combination_type = "linear" if len(adapters) == 1 else combination_type
    # the allocated rank, as in PEFT: the largest rank of each config (rank_pattern included)
    ranks = [max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise ConfigError(
            f"combination_type='linear' needs adapters of equal rank, got {dict(zip(adapters, ranks))}"
        )
    new_rank = ranks[0] if combination_type == "linear" else sum(ranks)
    layers = [
        (n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and set(adapters) & set(m.r)
    ]
    if any(not hasattr(m, "lora_A") for _, m in layers):
        raise ConfigError("add_weighted_adapter supports adapters on linear layers only")
    uneven = [
        n
        for n, m in layers
        if combination_type == "linear" and {m.r[a] for a in adapters if a in m.r} != {new_rank}
    ]
    if uneven:
        raise ConfigError(
            f"combination_type='linear' needs equal ranks, but they differ in {uneven[:3]}; use 'cat'"
        )
    config = dataclasses.replace(
        configs[adapters[0]],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=sorted(n for n, _ in layers),
        rank_pattern={},
        alpha_pattern={},
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        init_lora_weights=True,
    )
    inject(model, config, adapter_name, activate=False)
    with torch.no_grad():
        for _, layer in layers:
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
            if combination_type == "cat":
                new_a = torch.cat([layer.lora_A[a].weight * (w * layer.scaling[a]) for a, w in present], 0)
                new_b = torch.cat([layer.lora_B[a].weight for a, _ in present], 1)
            else:
                new_a = sum(
                    layer.lora_A[a].weight
                    * math.copysign(math.sqrt(abs(w * layer.scaling[a])), w * layer.scaling[a])
                    for a, w in present
                )
                new_b = sum(layer.lora_B[a].weight * math.sqrt(abs(w * layer.scaling[a])) for a, w in present)
            layer.lora_A[adapter_name].weight.zero_()[: new_a.shape[0]].copy_(new_a)
            layer.lora_B[adapter_name].weight.zero_()[:, : new_b.shape[1]].copy_(new_b)
    return model
