"""Injection: find the target modules (PEFT's matching rules, in one function), wrap them in place,
and freeze everything but the adapters.

The model keeps its class: wrappers replace submodules where they stand, so `generate`,
`torch.compile`, DDP and user code see the same object. The configs of the injected adapters are
kept on the model as `model._lorakit_configs` (name -> LoraConfig) for saving.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .config import LoraConfig
from .errors import AdapterStateError, ConfigError, TargetNotFoundError
from .layers import LoraLayer, LoraLinear, ModulesToSave, wrapper_for

CONFIGS_ATTR = "_lorakit_configs"
_CLASSIFIER_HEADS = ("score", "classifier")


def is_target(config: LoraConfig, name: str, head_names: frozenset[str] = frozenset()) -> bool:
    """Whether the module called `name` is a LoRA target under `config` (PEFT's semantics).

    `head_names` are the output heads that `"all-linear"` leaves out; the caller decides which
    modules are linear (see `find_targets`), so this function only looks at names.
    """
    if config.exclude_modules:
        ex = config.exclude_modules
        if re.fullmatch(ex, name) if isinstance(ex, str) else _name_in(name, ex):
            return False
    if config.modules_to_save and any(
        re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save
    ):
        return False
    targets = config.target_modules
    if targets == "all-linear":
        return name not in head_names
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not _name_in(name, targets):
        return False
    return _in_selected_layer(config, name)


def _name_in(name: str, names: list[str]) -> bool:
    return any(name == n or name.endswith("." + n) for n in names)


def _in_selected_layer(config: LoraConfig, name: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    idx = int(match["idx"])
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def _head_names(model: nn.Module) -> frozenset[str]:
    """The output head(s) that "all-linear" must skip: the LM head, or a classifier head."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    else:
        heads += [
            getattr(model, h) for h in _CLASSIFIER_HEADS if isinstance(getattr(model, h, None), nn.Module)
        ]
    ids = {id(h) for h in heads}
    return frozenset(n for n, m in model.named_modules() if id(m) in ids)


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules that are not inside a LoRA wrapper (a wrapper's A/B/base are never targets)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name)
        yield name, module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder (or encoder) blocks: its longest `nn.ModuleList`."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return max(lists, key=len) if lists else nn.ModuleList()


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` puts LoRA on. Raises `TargetNotFoundError` (listing the
    model's candidate names) when nothing matches, `ConfigError` when a match cannot be wrapped."""
    heads = _head_names(model)
    names = []
    for name, module in _candidates(model):
        if not name or not is_target(config, name, heads):
            continue
        if config.target_modules == "all-linear":
            kind = module.base_layer if isinstance(module, LoraLayer) else module
            if wrapper_for(kind) is not LoraLinear:
                continue
        elif not isinstance(module, LoraLayer) and wrapper_for(module) is None:
            if (
                config.target_modules
                and isinstance(config.target_modules, list)
                and not _has_children(module)
            ):
                raise ConfigError(
                    f"target module {name!r} is a {type(module).__name__}, which lorakit cannot wrap; "
                    "supported: nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d, Linear4bit, "
                    "or register your own with lorakit.layers.register(cls, wrapper)"
                )
            continue
        names.append(name)
    if not names:
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in _candidates(model) if n and wrapper_for(m) is not None}
        )
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Wrappable module names in this model: {leaves}"
        )
    return names


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(
    model: nn.Module, config: LoraConfig, adapter: str = "default", *, activate: bool = True
) -> nn.Module:
    """Add LoRA adapter `adapter` to the modules of `model` that `config` targets, in place.

    Everything except adapters (and `modules_to_save` copies, and biases per `config.bias`) is frozen.
    With `activate` (the default) the new adapter becomes the only active one; otherwise the active
    set is left as it was. Returns `model` (same object, same class).

    Raises `AdapterStateError` if `adapter` already exists, `TargetNotFoundError` if nothing matches,
    `ConfigError` for an invalid config or an unwrappable target.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"inject() needs a lorakit.LoraConfig, got {type(config).__name__}")
    config.validate()
    configs: dict[str, LoraConfig] = getattr(model, CONFIGS_ATTR, {})
    if adapter in configs:
        raise AdapterStateError(
            f"model already has an adapter named {adapter!r}; pick another name or delete it first"
        )
    targets = find_targets(model, config)
    first = not configs
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = wrapper_for(module)(module)
            _replace(model, name, module)
        module.update_layer(
            adapter,
            config.rank_for(name),
            config.alpha_for(name),
            config.lora_dropout,
            config.init_lora_weights,
            config.use_rslora,
        )
    for name, module in list(_candidates(model)):
        if name and config.modules_to_save and _name_in(name, config.modules_to_save):
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _replace(model, name, module)
            module.add_adapter(adapter)
    if base_name := _base_name(model):
        config.base_model_name_or_path = config.base_model_name_or_path or base_name
    configs[adapter] = config
    setattr(model, CONFIGS_ATTR, configs)
    from .adapters import active_adapters, set_adapter

    set_adapter(model, [adapter] if activate else (active_adapters(model) or [adapter]))
    _mark_bias(model, config.bias)
    return model


def _base_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return name or None


def _mark_bias(model: nn.Module, bias: str) -> None:
    if bias == "none":
        return
    for module in model.modules():
        if bias == "all" or isinstance(module, LoraLayer):
            target = module.base_layer if isinstance(module, LoraLayer) else module
            b = getattr(target, "bias", None)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(True)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, wrapper) for every LoRA-wrapped module of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    for module in model.modules():
        count = getattr(module, "num_quantized_params", None)
        if callable(count):
            total += count()
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    """'trainable params: 1,234 || all params: 5,678 || trainable%: 21.73'."""
    t, n = trainable_parameters(model)
    return f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"
