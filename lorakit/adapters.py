"""Several adapters on one model: list, activate (one or several at once), delete, disable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from . import _state
from .errors import AdapterStateError


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters injected into or loaded onto `model`, in the order they were added."""
    return _state.names(model)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters the forward currently adds (empty if none is injected)."""
    return _state.active(model)


def set_adapter(model: nn.Module, adapters: str | list[str]) -> None:
    """Make `adapters` (a name, or several names whose outputs add up) the active ones.

    Only active (and unmerged) adapters are trainable. Raises `AdapterStateError` for an unknown
    name, `ConfigError` for a name that cannot be an adapter name (not a string, empty, with '.').
    """
    names = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    for name in names:
        _state.check_name(name)
    _state.set_active(model, names)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove `adapter` from every layer. Raises `AdapterStateError` if unknown or merged."""
    known = _state.names(model)
    if adapter not in known:
        raise AdapterStateError(f"unknown adapter {adapter!r}; the model has {known}")
    merged = [m for m in _state.wrappers(model) if adapter in getattr(m, "merged_adapters", ())]
    if merged:
        raise AdapterStateError(
            f"adapter {adapter!r} is merged into the base weights; unmerge before deleting it"
        )
    for module in _state.wrappers(model):
        module.delete_adapter(adapter)
    _state.remove_config(model, adapter)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the `with` block (e.g. for a reference output).

    Raises `AdapterStateError` at the forward if an adapter is merged (unmerge first).
    """
    wrappers = list(_state.wrappers(model))
    previous = [w.disabled for w in wrappers]
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for w, was in zip(wrappers, previous):
            w.disabled = was
