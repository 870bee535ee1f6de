"""Several adapters on one model: list, activate (one or several at once), delete, disable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .errors import AdapterStateError
from .inject import CONFIGS_ATTR
from .layers import LoraLayer, ModulesToSave


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters injected into or loaded onto `model`, in the order they were added."""
    return list(getattr(model, CONFIGS_ATTR, {}))


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward currently adds (empty if none is injected)."""
    return list(getattr(model, "_lorakit_active", []))


def _wrappers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


def set_adapter(model: nn.Module, adapters: str | list[str]) -> None:
    """Make `adapters` (a name, or several names whose outputs add up) the active ones.

    Only active adapters are trainable. Raises `AdapterStateError` for an unknown name.
    """
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; the model has {known}")
    for module in _wrappers(model):
        module.set_active(names)
    model._lorakit_active = names


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove `adapter` from every layer. Raises `AdapterStateError` if unknown or merged."""
    configs = getattr(model, CONFIGS_ATTR, {})
    if adapter not in configs:
        raise AdapterStateError(f"unknown adapter {adapter!r}; the model has {list(configs)}")
    for module in _wrappers(model):
        module.delete_adapter(adapter)
    del configs[adapter]
    model._lorakit_active = [a for a in active_adapters(model) if a != adapter]


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the `with` block (e.g. for a reference output).

    Raises `AdapterStateError` at the forward if an adapter is merged (unmerge first).
    """
    wrappers = list(_wrappers(model))
    previous = [w.disabled for w in wrappers]
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for w, was in zip(wrappers, previous):
            w.disabled = was
