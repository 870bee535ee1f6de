"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are the module path prefixed with `base_model.model.`, without the adapter name
(`...q_proj.lora_A.weight`, `...embed_tokens.lora_embedding_A`, `modules_to_save` copies under the
module's plain name). One adapter is saved in the folder given, whatever its name; several in
PEFT's layout ("default" in the folder, any other in a subfolder named after it); loading reads
both. A save builds the whole folder under a temporary name and swaps it in (all-or-nothing).

lorakit adds `lorakit_fingerprint` to the config: the adapted modules' names and base shapes (and
the base model's name when known), so loading onto the wrong model fails before any tensor moves.
Loading reads safetensors only; pickle (`.bin`) files are refused unless `allow_pickle=True`;
NaN/Inf tensors and unusable adapter names are refused before the model changes.

An adapter given by Hub ID (`org/name`, no such local folder) is fetched through the Hugging Face
cache like a model (`lorakit.hf.hub_folder`, imported only then): downloaded when online, read from
the cache when offline (`HF_HUB_OFFLINE=1`); only the adapter files are fetched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, _state
from ._atomic import atomic_folder, clean_stale
from .adapters import delete_adapter, list_adapters, set_adapter
from .config import CONFIG_NAME, LoraConfig
from .errors import (
    AdapterFileError,
    AdapterStateError,
    LorakitError,
    ShapeMismatchError,
    storage_errors,
)
from .inject import inject, lora_layers
from .layers import LoraEmbedding, LoraLayer, LoraLinear, LoraParam, ModulesToSave
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
            for container in module.containers_of(adapter):  # DoRA: + lora_magnitude_vector
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


def _fingerprint_name(name: str, layer: LoraLayer) -> str:
    """A wrapper's name in the fingerprint: an adapted parameter goes by its own name on the plain
    model (`mlp.experts.gate_up_proj`), since nested wrappers' names do not exist before injection."""
    if isinstance(layer, LoraParam):
        return f"{name.replace('.base_layer', '')}.{layer.parameter_name}"
    return name


def _shape_at(model: nn.Module, name: str) -> list[int]:
    """The fingerprint shape of module (or adapted parameter) `name`; AttributeError if absent."""
    try:
        return _module_shape(model.get_submodule(name))
    except AttributeError:
        owner_name, _, pname = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        while isinstance(owner, LoraLayer):  # already wrapped by another adapter
            owner = owner.base_layer
        p = owner._parameters.get(pname)
        if p is None:
            raise
        return list(p.shape)


def _module_shape(module: nn.Module) -> list[int]:
    """The base weight's logical shape ([out, in] for every linear kind, GPT-2 Conv1D included;
    an adapted parameter's own shape)."""
    if isinstance(module, LoraParam):
        return list(module.param.shape)
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
    modules = {
        _fingerprint_name(name, m): _module_shape(m) for name, m in lora_layers(model) if adapter in m.r
    }
    return {"base_model_name_or_path": _config(model, adapter).base_model_name_or_path, "modules": modules}


def save_adapter(
    model: nn.Module,
    path: str | Path,
    adapter: str | list[str] | None = None,
    *,
    convert_to_lora: bool = False,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> list[Path]:
    """Write adapters as PEFT folders; returns the folders written.

    `convert_to_lora` (PEFT's `path_initial_model_for_weight_conversion`): a PiSSA/OLoRA adapter
    trained on the residual base is saved as a plain LoRA adapter of rank 2r for the *original* base
    (`A' = [A; A0]`, `B' = [B, -B0]`, r and alpha doubled), so it loads on the unmodified model.
    Raises `AdapterStateError` for an adapter that was not PiSSA/OLoRA-initialised in this session.

    `tensors` (adapter name -> PEFT-named tensors) are written instead of the model's own when given:
    a sharded model's adapter gathered whole (`lorakit.train.sharding.full_adapters`).

    Where each goes: saving one adapter (`adapter="alpha"`, or `None` on a model that has only
    one) writes it to `path` itself, whatever its name: the folder you name is the adapter folder.
    Saving several keeps PEFT's layout: "default" in `path`, every other one in `path/<name>`.
    `load_adapter` reads both layouts.

    All-or-nothing: the new `path` is built complete under a temporary name and swapped in as a
    whole (`_atomic.atomic_folder`), so a crash at any moment leaves the old folder or the new
    one, never a mix. What `path` held that this save does not rewrite (other adapters'
    subfolders, other files) is hard-linked into the new folder, so it is kept. Temporary folders
    that killed saves left beside `path` are removed first.

    Raises `AdapterStateError` for an unknown adapter or one with NaN/Inf weights,
    `StorageError` when the folder cannot be written (disk full: "no space left on device"),
    leaving `path` as it was.
    """
    path = Path(path)
    names = (
        list_adapters(model) if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    )
    if not names:
        raise AdapterStateError("the model has no adapters to save; call lorakit.inject first")
    files = {name: _adapter_files(model, name, None if tensors is None else tensors[name]) for name in names}
    if convert_to_lora:
        files = {name: _converted(model, name, *files[name]) for name in names}
    subfolder = {name: "" if len(names) == 1 or name == "default" else name for name in names}
    # what the new folder rewrites; an old nested copy of an adapter now saved at the top goes too,
    # or load_adapter(path, name) would still find the stale one in path/<name>
    replaced = {n for n in names if subfolder[n] or (path / n / CONFIG_NAME).is_file()}
    if not all(subfolder.values()):
        replaced |= {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME}
    with storage_errors(path):
        clean_stale(path.parent)
        with atomic_folder(path) as tmp:
            _carry_over(path, tmp, replaced)
            for name, (tensors, data) in files.items():
                folder = tmp / subfolder[name]
                folder.mkdir(exist_ok=True)
                save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
                (folder / CONFIG_NAME).write_text(
                    json.dumps(data, indent=2, sort_keys=True, default=list), encoding="utf-8"
                )
    return [path / subfolder[name] if subfolder[name] else path for name in names]


def _adapter_files(
    model: nn.Module, name: str, source: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config.json content) of adapter `name`, copied off the model (or `source`)."""
    config = _config(model, name)
    source = adapter_state_dict(model, name) if source is None else source
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in source.items()}
    bad = first_non_finite(tensors)
    if bad is not None:
        raise AdapterStateError(
            f"adapter {name!r}: tensor {bad} holds NaN or Inf values; refusing to save it "
            "(training diverged: lower the learning rate, or save an earlier checkpoint)"
        )
    data = config.to_dict()
    if config.target_modules == "all-linear":  # what PEFT writes: the resolved module names
        data["target_modules"] = sorted(
            n for n, m in lora_layers(model) if name in m.r and not isinstance(m, LoraParam)
        )
    # lorakit detects the transposed GPT-2 layout per layer; PEFT readers want the flag
    data["fan_in_fan_out"] = any(
        getattr(m, "fan_in_fan_out", False) for _, m in lora_layers(model) if name in m.r
    )
    data[FINGERPRINT_KEY] = fingerprint(model, name)
    data["lorakit_version"] = __version__
    return tensors, data


def _converted(model: nn.Module, name: str, tensors: dict, data: dict) -> tuple[dict, dict]:
    """(tensors, config) of PiSSA/OLoRA adapter `name` as a rank-2r LoRA for the original base:
    `s B A - s B0 A0 = s [B, -B0] [A; A0]` (PEFT's `subtract_mutated_init`)."""
    config = _config(model, name)
    init = config.init_lora_weights
    if not (isinstance(init, str) and (init.startswith("pissa") or init == "olora")):
        raise AdapterStateError(
            f"adapter {name!r} was not PiSSA/OLoRA-initialised (init_lora_weights={init!r}), so there is "
            "nothing to convert; save it without convert_to_lora"
        )
    if config.use_dora or (config.use_rslora and (config.rank_pattern or config.alpha_pattern)):
        raise AdapterStateError(
            f"adapter {name!r}: convert_to_lora cannot express a DoRA adapter, nor rslora with rank/alpha "
            "patterns (PEFT's rule), as a plain LoRA; save it without convert_to_lora"
        )
    tensors = dict(tensors)
    for layer_name, layer in lora_layers(model):
        if name not in layer.r:
            continue
        initial = layer.initial_weights(name)
        if initial is None:
            raise AdapterStateError(
                f"adapter {name!r}: {layer_name} has no initial A/B (the adapter was loaded or resumed, not "
                "initialised with PiSSA/OLoRA in this session), so it cannot be converted"
            )
        a0, b0 = initial
        key = f"{PREFIX}{layer_name}.lora_"
        tensors[key + "A.weight"] = torch.cat([tensors[key + "A.weight"], a0.cpu()], 0)
        tensors[key + "B.weight"] = torch.cat([tensors[key + "B.weight"], -b0.cpu()], 1)
    double = 2**0.5 if config.use_rslora else 2
    data = {
        **data,
        "init_lora_weights": True,
        "r": config.r * 2,
        "lora_alpha": config.lora_alpha * double,
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: 2 * v for k, v in config.alpha_pattern.items()},
    }
    return tensors, data


def _carry_over(old: Path, new: Path, replaced: set[str]) -> None:
    """Hard-link what folder `old` holds into `new`, but for the top-level entries in `replaced`."""
    if not old.is_dir():
        return
    for entry in old.iterdir():
        if entry.name not in replaced:
            _link_tree(entry, new / entry.name)


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)  # files are never rewritten in place, so sharing them is safe
        except OSError:  # a file system without hard links
            shutil.copy2(src, dst)


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
    if fp is None:
        return  # a PEFT-saved adapter: the tensor shapes are checked after injection instead
    modules = fp.get("modules") if isinstance(fp, dict) else None
    if not isinstance(modules, dict) or not all(
        isinstance(s, list) and all(type(d) is int for d in s) for s in modules.values()
    ):
        raise AdapterFileError(
            f"{source}: {FINGERPRINT_KEY} in {CONFIG_NAME} is malformed (expected "
            '{"modules": {name: [out, in]}}); re-save the adapter, or delete the key to skip the check'
        )
    bad = []
    for name, shape in modules.items():
        try:
            have = _shape_at(model, name)
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
    revision: str | None = None,
) -> nn.Module:
    """Load the adapter folder `path` onto `model` as `adapter` (default "default").

    `path` is the adapter folder itself, or (PEFT's layout for named adapters) a folder whose
    subfolder `path/<adapter>` holds it; the subfolder wins when both hold an adapter_config.json.
    A `path` that is no local folder but a Hub ID is fetched at `revision` (see `adapter_source`).
    The whole file must fit: a bad adapter name, a fingerprint that disagrees with the model, a
    missing or unexpected tensor, a wrong shape or NaN/Inf values raise (`ConfigError`,
    `ShapeMismatchError`, `AdapterFileError`) and leave the model as it was. Returns `model`.
    """
    name = "default" if adapter is None else adapter
    _state.check_name(name)  # before anything changes
    path = adapter_folder(adapter_source(path, revision, allow_pickle=allow_pickle), name)
    config = LoraConfig.from_json_file(path / CONFIG_NAME)
    tensors = read_adapter_tensors(path, allow_pickle=allow_pickle)
    _check_finite(tensors, path)
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


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf, or None if all are finite."""
    return next(
        (k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None
    )


def _check_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    key = first_non_finite(tensors)
    if key is not None:
        raise AdapterFileError(
            f"{source}: tensor {key} holds NaN or Inf values; the adapter is corrupt (did its "
            "training diverge?): retrain it or load an earlier checkpoint"
        )


def adapter_source(path: str | Path, revision: str | None = None, *, allow_pickle: bool = False) -> Path:
    """`path` itself when it exists, is absolute or starts with '.' (a local path); else the local
    snapshot of Hub repo `path` at `revision`, holding only adapter files (top level and PEFT's
    named-adapter subfolders). Raises `AdapterFileError` naming what was tried when neither has it."""
    local = Path(path)
    if local.exists() or local.is_absolute() or str(path).startswith("."):
        return local
    from .hf import hub_folder  # the Hub integration, imported only for a Hub ID

    names = (CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME) if allow_pickle else (CONFIG_NAME, WEIGHTS_NAME)
    patterns = (*names, *(f"*/{n}" for n in names))
    try:
        return hub_folder(str(path), revision, patterns, what="adapter")
    except LorakitError as e:
        raise AdapterFileError(str(e)) from None


def adapter_folder(path: str | Path, name: str = "default") -> Path:
    """The folder that holds adapter `name` for `path`: `path/<name>` if it holds an
    adapter_config.json (PEFT's layout for named adapters), else `path`. Raises `AdapterFileError`
    if `path` is not a folder."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(
            f"{path}: not an adapter folder (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)"
        )
    nested = path / name
    return nested if name != "default" and (nested / CONFIG_NAME).is_file() else path


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
