"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are the module path prefixed with `base_model.model.`, without the adapter name
(`...q_proj.lora_A.weight`, `...embed_tokens.lora_embedding_A`, `modules_to_save` copies under the
module's plain name). The adapter "default" is saved in the given folder, any other in a subfolder
named after it (PEFT's layout).

lorakit adds `lorakit_fingerprint` to the config: the adapted modules' names and base shapes (and
the base model's name when known), so loading onto the wrong model fails before any tensor moves.
Loading reads safetensors only; pickle (`.bin`) files are refused unless `allow_pickle=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, _state
from ._atomic import atomic_write, atomic_write_text
from .adapters import delete_adapter, list_adapters, set_adapter
from .config import CONFIG_NAME, LoraConfig
from .errors import AdapterFileError, AdapterStateError, LorakitError, ShapeMismatchError
from .inject import inject, lora_layers
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave
from .merge import unload
from .modeling import is_conv1d

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "lorakit_fingerprint"


def adapter_state_dict(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (views of the live parameters)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            for container in module.adapter_containers:
                item = getattr(module, container)[adapter]
                if isinstance(item, nn.Parameter):
                    out[f"{PREFIX}{name}.{container}"] = item
                else:
                    for key, t in item.state_dict(keep_vars=True).items():
                        out[f"{PREFIX}{name}.{container}.{key}"] = t
        elif isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
            for key, t in module.modules_to_save[adapter].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{name}.{key}"] = t
    bias = _config(model, adapter).bias
    if bias != "none":  # trained biases, under their model names (as PEFT saves them)
        for key, p in model.named_parameters():
            if not key.endswith("bias") or any(
                s in key for s in ("lora_", "original_module.", "modules_to_save.")
            ):
                continue
            if bias == "all" or ".base_layer." in key:
                out[PREFIX + key] = p
    return out


def _config(model: nn.Module, adapter: str) -> LoraConfig:
    return _state.config(model, adapter)


def _module_shape(module: nn.Module) -> list[int]:
    """The base weight's logical shape ([out, in] for every linear kind, GPT-2 Conv1D included)."""
    if isinstance(module, LoraLayer):
        if isinstance(module, LoraLinear):
            return [module.out_features, module.in_features]
        module = module.base_layer
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return [module.out_features, module.in_features]
    if is_conv1d(module):
        return [module.weight.shape[1], module.weight.shape[0]]
    w = getattr(module, "weight", None)
    return list(w.shape) if isinstance(w, torch.Tensor) else []


def fingerprint(model: nn.Module, adapter: str = "default") -> dict:
    """Names and base shapes of the modules `adapter` adapts, plus the base model's name."""
    modules = {name: _module_shape(m) for name, m in lora_layers(model) if adapter in m.r}
    return {"base_model_name_or_path": _config(model, adapter).base_model_name_or_path, "modules": modules}


def save_adapter(model: nn.Module, path: str | Path, adapter: str | list[str] | None = None) -> list[Path]:
    """Write adapters as PEFT folders; returns the folders written.

    `adapter=None` saves every adapter. "default" goes to `path`, any other name to `path/name`.
    Each file is written atomically: a crash mid-save leaves the previous files intact.
    Raises `AdapterStateError` for an unknown adapter.
    """
    path = Path(path)
    names = (
        list_adapters(model) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    )
    if not names:
        raise AdapterStateError("the model has no adapters to save; call lorakit.inject first")
    written = []
    for name in names:
        config = _config(model, name)
        folder = path if name == "default" else path / name
        tensors = {
            k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, name).items()
        }
        data = config.to_dict()
        if config.target_modules == "all-linear":  # what PEFT writes: the resolved module names
            data["target_modules"] = sorted(n for n, m in lora_layers(model) if name in m.r)
        # lorakit detects the transposed GPT-2 layout per layer; PEFT readers want the flag
        data["fan_in_fan_out"] = any(
            getattr(m, "fan_in_fan_out", False) for _, m in lora_layers(model) if name in m.r
        )
        data[FINGERPRINT_KEY] = fingerprint(model, name)
        data["lorakit_version"] = __version__
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(
            folder / WEIGHTS_NAME, lambda tmp, t=tensors: save_file(t, str(tmp), metadata={"format": "pt"})
        )
        atomic_write_text(folder / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True, default=list))
        written.append(folder)
    return written


def read_adapter_tensors(folder: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder. Raises `AdapterFileError` if missing, corrupt or pickle-only."""
    folder = Path(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickle = folder / PICKLE_NAME
        if not pickle.is_file():
            raise AdapterFileError(f"{folder}: no {WEIGHTS_NAME} (nor {PICKLE_NAME}) in this folder")
        if not allow_pickle:
            raise AdapterFileError(
                f"{pickle}: refusing to read a pickle file, since unpickling can run arbitrary code. "
                "Convert it to safetensors, or pass allow_pickle=True if you trust its source"
            )
        try:
            return torch.load(pickle, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterFileError(f"{pickle}: cannot be read ({e})") from None
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(
            f"{weights}: corrupt or truncated safetensors file ({e}); re-save the adapter"
        ) from None


def _check_fingerprint(model: nn.Module, config: LoraConfig, source: Path) -> None:
    fp = config.extra.get(FINGERPRINT_KEY)
    if not isinstance(fp, dict):
        return  # a PEFT-saved adapter: the tensor shapes are checked after injection instead
    bad = []
    for name, shape in (fp.get("modules") or {}).items():
        try:
            have = _module_shape(model.get_submodule(name))
        except AttributeError:
            bad.append(f"{name} (missing from the model)")
            continue
        if list(have) != list(shape):
            bad.append(f"{name} (adapter made for {shape}, model has {have})")
    if bad:
        base = fp.get("base_model_name_or_path")
        raise ShapeMismatchError(
            f"{source}: this adapter was made for another model{f' ({base})' if base else ''}; "
            f"{len(bad)} module(s) differ, first: {'; '.join(bad[:5])}"
        )


def load_adapter(
    model: nn.Module,
    path: str | Path,
    adapter: str | None = None,
    *,
    activate: bool = True,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load the adapter folder `path` onto `model` as `adapter` (default "default").

    The whole file must fit: a fingerprint that disagrees with the model, a missing or unexpected
    tensor, or a wrong shape raises (`ShapeMismatchError` / `AdapterFileError`) and leaves the model
    as it was. Returns `model`.
    """
    path = Path(path)
    name = adapter or "default"
    if not path.is_dir():
        raise AdapterFileError(
            f"{path}: not an adapter folder (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)"
        )
    config = LoraConfig.from_json_file(path / CONFIG_NAME)
    tensors = read_adapter_tensors(path, allow_pickle=allow_pickle)
    _check_fingerprint(model, config, path)
    had_adapters = bool(list_adapters(model))
    previous_active = _state.active(model)
    inject(model, config, name, activate=activate)
    try:
        _copy_into(model, name, tensors, path)
    except LorakitError:
        delete_adapter(model, name)
        if not had_adapters:
            unload(model, merge=False)
        elif previous_active:
            set_adapter(model, previous_active)
        raise
    return model


def _copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = adapter_state_dict(model, name)
    missing = sorted(set(expected) - set(tensors))
    # PEFT also saves the full table of an adapted embedding (it may have been resized): take it
    for layer_name, layer in lora_layers(model):
        key = f"{PREFIX}{layer_name}.base_layer.weight"
        if isinstance(layer, LoraEmbedding) and key in tensors:
            expected[key] = layer.base_layer.weight
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{source}: the adapter's tensors do not match the modules its config targets on this model. "
            f"Missing ({len(missing)}): {missing[:8]}; unexpected ({len(unexpected)}): {unexpected[:8]}"
        )
    for key, target in expected.items():
        value = tensors[key]
        if not value.is_floating_point():
            raise AdapterFileError(
                f"{source}: tensor {key} has dtype {value.dtype}; adapter weights must be floating point"
            )
        if value.shape != target.shape:
            raise ShapeMismatchError(
                f"{source}: tensor {key} has shape {list(value.shape)} but the model expects {list(target.shape)}; "
                "the adapter was made for a model of another size"
            )
        with torch.no_grad():
            target.copy_(value)
