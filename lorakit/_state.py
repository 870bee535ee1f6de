"""The model-level adapter state, and its only owner: which adapters a model carries (name ->
`LoraConfig`, in the order they were added) and which of them are active.

Everything else (inject, adapters, merge, io, training checkpoints, quant, serve) reads and changes
that state through these functions, never through the attributes themselves.

The active set is stored once here, on the model. Each wrapped layer also keeps the active names
it carries (`LoraLayer.active_adapters`) because its forward runs without a reference to the model
(a layer is a plain submodule); `set_active` is the only function that writes those copies, so the
two never disagree.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .errors import AdapterStateError, ConfigError
from .layers import LoraLayer, ModulesToSave

_CONFIGS = "_lorakit_configs"
_ACTIVE = "_lorakit_active"


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """A copy of the model's adapters, name -> config, in the order they were added."""
    return dict(getattr(model, _CONFIGS, {}))


def names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(getattr(model, _CONFIGS, {}))


def has_adapters(model: nn.Module) -> bool:
    """Whether any adapter is injected into or loaded onto `model`."""
    return bool(getattr(model, _CONFIGS, None))


def config(model: nn.Module, name: str) -> LoraConfig:
    """The config of adapter `name`. Raises `AdapterStateError` naming the model's adapters."""
    known = getattr(model, _CONFIGS, {})
    if name not in known:
        raise AdapterStateError(f"model has no adapter named {name!r}; it has {list(known)}")
    return known[name]


def check_name(name: object) -> str:
    """Return `name` if it can name an adapter, else raise `ConfigError`.

    Adapter names become keys of `nn.ModuleDict`s and parts of saved tensor paths, so they must be
    non-empty strings without '.' (PyTorch cannot hold a dotted key in a module's children).
    """
    if not isinstance(name, str):
        raise ConfigError(f"an adapter name must be a string, got {name!r} ({type(name).__name__})")
    if not name or "." in name:
        raise ConfigError(
            f"invalid adapter name {name!r}: names must be non-empty and may not contain '.'; "
            "use '_' or '-' instead (e.g. 'v1_2' for 'v1.2')"
        )
    if hasattr(nn.ModuleDict(), name):  # ModuleDict refuses keys that shadow its attributes
        raise ConfigError(
            f"invalid adapter name {name!r}: it is reserved by torch's ModuleDict; pick another"
        )
    return name


def as_names(adapters: object) -> list[str]:
    """`adapters` (a name, or a list/tuple of names) as a list of checked names (see `check_name`)."""
    items = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]
    return [check_name(n) for n in items]


def add_config(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Record adapter `name` with `config`. Raises `AdapterStateError` if the name is taken."""
    known = getattr(model, _CONFIGS, {})
    if name in known:
        raise AdapterStateError(
            f"model already has an adapter named {name!r}; pick another name or delete it first"
        )
    setattr(model, _CONFIGS, {**known, name: config})


def remove_config(model: nn.Module, name: str) -> None:
    """Forget adapter `name` (and drop it from the active set); its layers are the caller's job."""
    known = {k: v for k, v in getattr(model, _CONFIGS, {}).items() if k != name}
    setattr(model, _CONFIGS, known)
    set_active(model, [a for a in active(model) if a != name])


def clear(model: nn.Module) -> None:
    """Remove all adapter state from `model` (after its wrappers are gone)."""
    for attr in (_CONFIGS, _ACTIVE):
        if hasattr(model, attr):
            delattr(model, attr)


def active(model: nn.Module) -> list[str]:
    """The adapters the forward adds (empty if none is injected)."""
    return list(getattr(model, _ACTIVE, []))


def named_wrappers(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    """(name, wrapper) for every LoRA wrapper and `modules_to_save` wrapper of `model`, in
    `named_modules` order. The walk enters a LoRA layer only through its base layer, not its
    adapters' parts (A, B, dropout: with 8 adapters on SmolLM2-135M, 6,000 of the model's 6,500
    modules, and never a wrapper); the server finds the wrappers at every change of its batch."""
    seen: set[int] = set()
    todo: list[tuple[str, nn.Module]] = [("", model)]
    while todo:
        name, module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module
        children = {"base_layer": module.base_layer} if isinstance(module, LoraLayer) else module._modules
        todo.extend(
            reversed([(f"{name}.{n}" if name else n, m) for n, m in children.items() if m is not None])
        )


def wrappers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    """Every LoRA wrapper and `modules_to_save` wrapper of `model`."""
    for _, module in named_wrappers(model):
        yield module


def set_active(model: nn.Module, adapters: list[str]) -> None:
    """Make exactly `adapters` active on the model and in every wrapper (the only writer of both).

    Only active, unmerged adapters are trainable. Raises `AdapterStateError` for an unknown name.
    """
    names_ = list(adapters)
    known = names(model)
    unknown = [n for n in names_ if n not in known]
    if unknown:
        raise AdapterStateError(f"unknown adapter(s) {unknown}; the model has {known}")
    for module in wrappers(model):
        module.set_active(names_)
    setattr(model, _ACTIVE, names_)
