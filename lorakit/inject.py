"""Injection: find the target modules (PEFT's matching rules, in one function), wrap them in place,
and freeze everything but the adapters.

The model keeps its class: wrappers replace submodules where they stand, so `generate`,
`torch.compile`, DDP and user code see the same object. The configs of the injected adapters are
recorded through `lorakit._state` (name -> LoraConfig) for saving.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from torch import nn

from . import _state
from .config import LoraConfig
from .errors import AdapterStateError, ConfigError, LorakitError, TargetNotFoundError
from .layers import LoraLayer, LoraLinear, LoraParam, ModulesToSave, TrainableTokens, wrapper_for
from .modeling import output_head_names, replace_module


def is_target(config: LoraConfig, name: str, head_names: frozenset[str] = frozenset()) -> bool:
    """Whether the module called `name` is a LoRA target under `config` (PEFT's semantics).

    `head_names` are the output heads that `"all-linear"` leaves out; the caller decides which
    modules are linear (see `find_targets`), so this function only looks at names. Raises
    `ConfigError` for an invalid regex or layer selection.
    """
    return _name_match(config, name, head_names) and _in_selected_layer(config, name)


def _in_selected_layer(config: LoraConfig, name: str) -> bool:
    """Whether `layers_to_transform` keeps `name`; as in PEFT, a list entry that is the module's
    full name selects it whatever its layer."""
    wanted = _wanted_layers(config)
    if wanted is None or (isinstance(config.target_modules, list) and name in config.target_modules):
        return True
    idx = _layer_index(config, name)
    return idx is not None and idx in wanted


def _name_match(config: LoraConfig, name: str, head_names: frozenset[str]) -> bool:
    """`is_target` without the layer selection (`layers_to_transform`)."""
    if config.exclude_modules:
        ex = config.exclude_modules
        if _fullmatch(ex, name) if isinstance(ex, str) else _name_in(name, ex):
            return False
    if config.modules_to_save and any(
        re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save
    ):
        return False
    targets = config.target_modules
    if targets == "all-linear":
        return name not in head_names
    if isinstance(targets, str):
        return _fullmatch(targets, name)
    return _name_in(name, targets)


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as e:
        raise ConfigError(f"invalid regex {pattern!r} in the LoRA config ({e}); fix the pattern") from None


def _name_in(name: str, names: list[str]) -> bool:
    return any(name == n or name.endswith("." + n) for n in names)


def _check_matching(config: LoraConfig) -> None:
    """The matching fields' types, and PEFT's rule that a regex target takes no layer selection."""
    for key in ("target_modules", "exclude_modules"):
        value = getattr(config, key)
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        if not ok and not (value is None and (key == "exclude_modules" or config.target_parameters)):
            raise ConfigError(
                f"LoraConfig.{key} must be a list of module names or a regex string, got {value!r}"
            )
    for key in ("modules_to_save", "layers_pattern"):
        value = getattr(config, key)
        items = [value] if isinstance(value, str) and key == "layers_pattern" else value
        if value is not None and not (isinstance(items, list) and all(isinstance(v, str) for v in items)):
            raise ConfigError(f"LoraConfig.{key} must be a list of names, got {value!r}")
        for v in items or []:
            _fullmatch(v, "")  # each is used inside a regex: refuse an invalid one here
    layered = _wanted_layers(config) is not None or config.layers_pattern
    if layered and isinstance(config.target_modules, str) and config.target_modules != "all-linear":
        # PEFT's LoraConfig refuses this too, so such an adapter could never be read back by PEFT
        raise ConfigError(
            f"layers_to_transform/layers_pattern cannot be combined with the regex target_modules="
            f"{config.target_modules!r} (PEFT's rule); put the layer numbers in the regex, e.g. "
            r"'.*\.layers\.(0|1)\..*q_proj', or use a list of module names"
        )


def _wanted_layers(config: LoraConfig) -> set[int] | None:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return None
    items = [wanted] if isinstance(wanted, int) and not isinstance(wanted, bool) else wanted
    if not isinstance(items, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise ConfigError(
            f"LoraConfig.layers_to_transform must be a layer index or a list of indices (>= 0), got {wanted!r}"
        )
    return set(items)


def _layer_index(config: LoraConfig, name: str) -> int | None:
    """The decoder-layer number in `name` (PEFT's rule: the first numbered part, or the one after
    `layers_pattern`), or None."""
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match["idx"]) if match else None


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules that are not inside a LoRA wrapper (a wrapper's A/B/base are never targets)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name)
        yield name, module


def _wrappable(config: LoraConfig, name: str, module: nn.Module) -> bool:
    """Whether a name-matched module gets a wrapper; a leaf named in a list that cannot be
    wrapped is a `ConfigError`."""
    kind = module.base_layer if isinstance(module, LoraLayer) else module
    wrapper = wrapper_for(kind)
    if config.target_modules == "all-linear":
        return wrapper is not None and issubclass(wrapper, LoraLinear)  # user subclasses too
    if wrapper is not None:
        return True
    if isinstance(config.target_modules, list) and not _has_children(module):
        raise ConfigError(
            f"target module {name!r} is a {type(module).__name__}, which lorakit cannot wrap; "
            "supported: nn.Linear, transformers Conv1D, nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention, Linear4bit, "
            "or register your own with lorakit.layers.register(cls, wrapper)"
        )
    return False


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` puts LoRA on. Raises `TargetNotFoundError` (listing the
    model's candidate names) when nothing matches or `layers_to_transform` names layers the model
    lacks, `ConfigError` when a match cannot be wrapped or a matching field is invalid."""
    _check_matching(config)
    if not config.target_modules:  # None or []: only parameters are targeted
        return []
    heads = output_head_names(model)
    names, layers = [], set()
    for name, module in _candidates(model):
        if not name or not _name_match(config, name, heads) or not _wrappable(config, name, module):
            continue
        idx = _layer_index(config, name)
        layers |= {idx} if idx is not None else set()
        if _in_selected_layer(config, name):
            names.append(name)
    _check_layers_exist(model, config, layers)
    if not names and (config.target_modules or not config.target_parameters):
        leaves = sorted(
            {n.rsplit(".", 1)[-1] for n, m in _candidates(model) if n and wrapper_for(m) is not None}
        )
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} matches no module of {type(model).__name__}. "
            f"Wrappable module names in this model: {leaves}"
        )
    return names


def _check_layers_exist(model: nn.Module, config: LoraConfig, layers: set[int]) -> None:
    wanted = _wanted_layers(config)
    missing = sorted(wanted - layers) if wanted is not None else []
    if not missing:
        return
    have = f"layers {min(layers)}-{max(layers)}" if layers else "no numbered layers"
    raise TargetNotFoundError(
        f"layers_to_transform names layer(s) {missing} that {type(model).__name__} does not have: the modules "
        f"matching target_modules={config.target_modules!r} (layers_pattern={config.layers_pattern!r}) are in "
        f"{have}; pick indices in that range"
    )


def find_parameter_targets(
    model: nn.Module, config: LoraConfig, modules: list[str] = ()
) -> list[tuple[str, str]]:
    """(module name, parameter name) of every parameter `config.target_parameters` adapts (PEFT's
    rule: `module.param` equals a target or ends with `.target`), a module's parameters in their
    registration order (the first is wrapped innermost, as in PEFT). Raises `ConfigError` for a
    parameter of the model itself or of a module in `modules` (targeted by `target_modules`), and
    `TargetNotFoundError` when nothing matches."""
    wanted = sorted(set(config.target_parameters or []))
    if not wanted:
        return []
    found = []
    for name, module in _candidates(model):
        owner = module
        while isinstance(owner, LoraParam):
            owner = owner.base_layer
        for pname, p in owner.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if p is None or not any(key == t or key.endswith("." + t) for t in wanted):
                continue
            if not name:
                raise ConfigError(
                    f"target_parameters: {pname!r} belongs to the model itself; LoRA cannot wrap it"
                )
            if name in modules or (isinstance(module, LoraLayer) and not isinstance(module, LoraParam)):
                raise ConfigError(
                    f"target_parameters: {key!r} belongs to {name}, which target_modules adapts too; "
                    "target the module or its parameter, not both (PEFT's rule)"
                )
            found.append((name, pname))
    if not found:
        params = sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dim() in (2, 3)})
        raise TargetNotFoundError(
            f"target_parameters={wanted} matches no parameter of {type(model).__name__}. "
            f"2-D and 3-D parameter names in this model: {params[:40]}"
        )
    return found


# model types whose MoE experts transformers 5 fuses into 3-D parameters, and for which PEFT 0.21.2
# turns "all-linear" into the router and experts as target_parameters, gate_up_proj (two fused
# projections, each at rank r in transformers 4) at rank 2r and alpha 2*alpha
# (peft.utils.transformers_weight_conversion: _MODEL_TO_CONVERSION_PATTERN onto mixtral/qwen2_moe)
FUSED_EXPERT_MODELS = frozenset(
    "mixtral minimax minimax_m2 qwen3_moe qwen3_next qwen3_omni_moe qwen3_omni_moe_thinker "
    "qwen3_omni_moe_text olmoe flex_olmo deepseek_v2 deepseek_v3 deepseek_v32 dots1 ernie4_5_moe "
    "glm4_moe glm4_moe_lite glm_moe_dsa glm4v_moe longcat_flash solar_open mellum beam hunyuan_v1_moe "
    "sarvam_mla exaone_moe cohere2_moe afmoe Dots3NoteTextModel UnlimitedOcrTextModel".split()
)
FUSED_EXPERT_PARAMETERS = ("gate.weight", "gate_up_proj", "down_proj")


def resolve_all_linear(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """`config` with "all-linear" extended to the router and experts on a fused-MoE model (see
    `FUSED_EXPERT_MODELS`), as PEFT does; any other config is returned as it is."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules != "all-linear" or model_type not in FUSED_EXPERT_MODELS:
        return config
    fused = r".*\.gate_up_proj"
    return dataclasses.replace(
        config,
        target_parameters=sorted({*(config.target_parameters or []), *FUSED_EXPERT_PARAMETERS}),
        rank_pattern={**config.rank_pattern, fused: config.r * 2},
        alpha_pattern={**config.alpha_pattern, fused: config.lora_alpha * 2},
    )


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def inject(
    model: nn.Module, config: LoraConfig, adapter: str = "default", *, activate: bool = True
) -> nn.Module:
    """Add LoRA adapter `adapter` to the modules of `model` that `config` targets, in place.

    Everything except adapters (and `modules_to_save` copies, and biases per `config.bias`) is frozen.
    With `activate` (the default) the new adapter becomes the only active one; otherwise the active
    set is left as it was. Returns `model` (same object, same class).

    All or nothing: if anything fails, the model is exactly as it was (no wrapper, no half-added
    adapter, the same `requires_grad` flags). Raises `AdapterStateError` if `adapter` already
    exists, `TargetNotFoundError` if nothing matches, `ConfigError` for an invalid config or name,
    an unwrappable target, or an adapter that cannot be built (e.g. a rank too large to allocate).
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"inject() needs a lorakit.LoraConfig, got {type(config).__name__}")
    _state.check_name(adapter)
    config.validate()
    if adapter in _state.names(model):
        raise AdapterStateError(
            f"model already has an adapter named {adapter!r}; pick another name or delete it first"
        )
    config = resolve_all_linear(model, config)
    targets = find_targets(model, config)
    params = find_parameter_targets(model, config, targets)
    _check_same_parameters(model, config)
    undo = _Undo(model, adapter)
    try:
        _apply(model, config, adapter, targets, undo, activate, params)
    except BaseException:
        undo.run()
        raise
    return model


def _check_same_parameters(model: nn.Module, config: LoraConfig) -> None:
    """PEFT's rule: every adapter with `target_parameters` targets the same set (the wrappers nest)."""
    mine = set(config.target_parameters or [])
    for other, cfg in _state.configs(model).items():
        theirs = set(cfg.target_parameters or [])
        if mine and theirs and mine != theirs:
            raise ConfigError(
                f"target_parameters={sorted(mine)} differs from adapter {other!r}'s {sorted(theirs)}: "
                "adapters that target parameters must all target the same ones (PEFT's rule)"
            )


def _apply(
    model: nn.Module,
    config: LoraConfig,
    adapter: str,
    targets: list[str],
    undo: _Undo,
    activate: bool,
    params: list[tuple[str, str]] = (),
) -> None:
    if not _state.has_adapters(model):
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        _add_adapter(undo.wrap(name, wrapper_for), config, adapter, name)
    for name, pname in params:
        _add_adapter(undo.wrap_param(name, pname), config, adapter, f"{name}.{pname}")
    for name, _ in list(_candidates(model)):
        if name and config.modules_to_save and _name_in(name, config.modules_to_save):
            undo.wrap(name, lambda m: ModulesToSave).add_adapter(adapter)
    _add_token_rows(model, config, adapter, undo)
    _state.add_config(model, adapter, config)
    _state.set_active(model, [adapter] if activate else (undo.active or [adapter]))
    _mark_bias(model, config.bias)
    if not config.base_model_name_or_path and (base_name := _base_name(model)):
        config.base_model_name_or_path = base_name


def _add_adapter(module: LoraLayer, config: LoraConfig, adapter: str, key: str) -> None:
    """Add `adapter` to the wrapper `module` (called `key` in rank/alpha patterns)."""
    r = config.rank_for(key)
    try:
        module.update_layer(
            adapter,
            r,
            config.alpha_for(key),
            config.lora_dropout,
            config.init_lora_weights,
            config.use_rslora,
            use_dora=config.use_dora,
            loftq_config=config.loftq_config,
            lora_bias=config.lora_bias,
        )
    except (RuntimeError, MemoryError, ValueError, TypeError, OverflowError) as e:
        if isinstance(e, LorakitError):
            raise type(e)(f"{key}: {e}") from None
        raise ConfigError(f"cannot build adapter {adapter!r} on {key} with r={r}: {e}") from None


def _add_token_rows(model: nn.Module, config: LoraConfig, adapter: str, undo: _Undo) -> None:
    """`config.trainable_token_indices`: wrap each named embedding (a list: the input embedding)
    in `TrainableTokens`, and every other module whose weight is that embedding's (a tied LM head)
    in one reading the same rows. Raises `ConfigError` for a name that is not a module."""
    spec = config.trainable_token_indices
    if not spec:
        return
    if isinstance(spec, list):
        get_in = getattr(model, "get_input_embeddings", None)
        embedding = get_in() if callable(get_in) else None
        name = next((n for n, m in model.named_modules() if m is embedding and embedding is not None), None)
        if name is None:
            raise ConfigError(
                "trainable_token_indices is a list but the model has no input embedding "
                "(get_input_embeddings); give {module name: [ids]}"
            )
        spec = {name: spec}
    plain = {  # the modules outside wrappers, a wrapper standing for the module it holds
        n: m.original_module if isinstance(m, ModulesToSave) else m for n, m in _candidates(model) if n
    }
    for key, indices in spec.items():
        names = [n for n in plain if _name_in(n, [key])]
        if not names:
            raise ConfigError(f"trainable_token_indices: no module named {key!r} in the model")
        for name in names:
            if isinstance(plain[name], LoraLayer):
                raise ConfigError(
                    f"trainable_token_indices: {name} already has LoRA; train its rows or LoRA, not both"
                )
            weight = plain[name].weight
            rows = undo.wrap(name, lambda m: TrainableTokens).add_rows(adapter, indices)
            for other, module in plain.items():  # a head tied to the embedding sees the same rows
                if other != name and isinstance(module, nn.Linear) and module.weight is weight:
                    undo.wrap(other, lambda m: TrainableTokens).add_rows(adapter, indices, tied=rows)


class _Undo:
    """What `inject` changed, to put the model back exactly as it was if a step fails."""

    def __init__(self, model: nn.Module, adapter: str) -> None:
        self.model, self.adapter = model, adapter
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.active = _state.active(model)
        self.wrapped: list[tuple[str, nn.Module]] = []  # (name, original module)
        self.touched: list[nn.Module] = []  # wrappers that got the adapter

    def wrap(self, name: str, wrapper_of) -> LoraLayer | ModulesToSave:
        """The wrapper at `name`, creating it (and remembering the original) if needed."""
        module = self.model.get_submodule(name)
        if not isinstance(module, (LoraLayer, ModulesToSave)):
            original, module = module, wrapper_of(module)(module)
            replace_module(self.model, name, module)
            self.wrapped.append((name, original))
            # wrappers a wrapper put inside its base (MultiheadAttention's out_proj), undone first
            self.wrapped += [(f"{name}.{inner}", m) for inner, m in getattr(module, "inner_originals", [])]
        self.touched.append(module)
        return module

    def wrap_param(self, name: str, parameter: str) -> LoraParam:
        """The `LoraParam` adapting `parameter` of the module at `name`, nesting a new one if needed."""
        module = self.model.get_submodule(name)
        inner = module
        while isinstance(inner, LoraParam):
            if inner.parameter_name == parameter:
                self.touched.append(inner)
                return inner
            inner = inner.base_layer
        wrapper = LoraParam(module, parameter)
        replace_module(self.model, name, wrapper)
        self.wrapped.append((name, module))
        self.touched.append(wrapper)
        return wrapper

    def run(self) -> None:
        for module in self.touched:
            module.delete_adapter(self.adapter)
        for name, original in reversed(self.wrapped):
            replace_module(self.model, name, original)
        if self.adapter in _state.names(self.model):  # inject refused existing names up front
            _state.remove_config(self.model, self.adapter)
        if _state.has_adapters(self.model):
            _state.set_active(self.model, self.active)
        else:
            _state.clear(self.model)
        for p, flag in self.flags:
            p.requires_grad_(flag)


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
    for name, module in _state.named_wrappers(model):
        if isinstance(module, LoraLayer):
            yield name, module


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        if not p.is_floating_point():  # packed 4-bit codes: counted below at their unpacked size
            continue
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    for module in model.modules():
        # the module's own method: a LoRA wrapper also answers for its base layer's (attribute
        # fall-through), which would count a 4-bit base twice
        count = getattr(type(module), "num_quantized_params", None)
        if callable(count):
            total += count(module)
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    """'trainable params: 1,234 || all params: 5,678 || trainable%: 21.73'."""
    t, n = trainable_parameters(model)
    return f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(n, 1):.4f}"
