"""Merge adapters into the base weights (zero inference overhead), unmerge, and unload the wrappers."""

from __future__ import annotations

from torch import nn

from .adapters import active_adapters
from .errors import AdapterStateError
from .inject import CONFIGS_ATTR, _replace
from .layers import LoraLayer, ModulesToSave


def merge(model: nn.Module, adapters: str | list[str] | None = None) -> nn.Module:
    """Add `adapters` (default: the active ones) into the base weights. The forward then skips them.

    Raises `AdapterStateError` for an unknown adapter name.
    """
    names = (
        active_adapters(model) if adapters is None else [adapters] if isinstance(adapters, str) else adapters
    )
    _check_known(model, names)
    _check_untied(model)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge(names)
    return model


def _check_known(model: nn.Module, names: list[str]) -> None:
    known = list(getattr(model, CONFIGS_ATTR, {}))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterStateError(f"cannot merge unknown adapter(s) {unknown}; the model has {known}")


def _check_untied(model: nn.Module) -> None:
    """Refuse to merge into a weight another module shares (a tied embedding / LM head): the merge
    would change both, while the unmerged adapter changes only one."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for module in model.modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            weight = getattr(module.base_layer, "weight", None)
            shared = owners.get(id(weight), [])
            if len(shared) > 1:
                raise AdapterStateError(
                    f"cannot merge: the adapted weight is shared by {shared} (tied embeddings), so merging would "
                    "change all of them. Untie the weights first (clone the output head's weight), or keep the "
                    "adapter unmerged"
                )


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from the base weights, restoring them to within float rounding."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every wrapper, returning the plain model (same object and class as before injection).

    With `merge` the active adapters are merged first, and `modules_to_save` modules keep the active
    adapter's trained copy; without it the original weights and modules come back.
    """
    if merge:
        _check_untied(model)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            if merge:
                module.merge(module.active_adapters)
            else:
                module.unmerge()
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            _replace(model, name, module.base_layer)
        elif isinstance(module, ModulesToSave):
            _replace(model, name, module.current() if merge else module.original_module)
    for attr in (CONFIGS_ATTR, "_lorakit_active"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
