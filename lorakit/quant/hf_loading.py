"""Load a Hugging Face checkpoint straight into 4-bit, and save one transformers + bitsandbytes read.

The transformers integration of `lorakit.quant` (the core, nf4/linear4bit/quantize/bnb_format/
safetensors_io, imports only torch and safetensors); `transformers` is imported inside the functions.

    load_quantized(path, task="causal-lm", skip_modules=DEFAULT_SKIP, compute_dtype=torch.float32,
                   dtype=None, blocksize=64, double_quant=True, num_labels=None, model_cls=None,
                   trim_heap=False) -> model
        Build a Hugging Face model from `path` (a folder with config.json and *.safetensors) on the
        meta device, swap the linear layers QLoRA quantizes (`quantize.should_quantize`) for empty
        `Linear4bit`s, then read the checkpoint one tensor at a time, quantizing each linear weight
        as it arrives. Peak memory is about the 4-bit model + the full-precision layers
        (embeddings, norms, head) + one linear weight (+ glibc's retained heap unless `trim_heap`).
        A checkpoint that transformers + bitsandbytes saved in 4-bit (`weight.absmax`, ...,
        `weight.quant_state.bitsandbytes__nf4`) is read as it is, without re-quantizing.

    save_quantized(model, folder) -> None
        Write `model.safetensors` (4-bit layers in bitsandbytes' form) and, for a Hugging Face
        model, config.json with the matching `quantization_config`, which transformers +
        bitsandbytes and `load_quantized` read back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .._heap import release_freed_memory
from ..errors import QuantizationError
from ..modeling import replace_module, tied_heads
from ..tasks import auto_model_class
from .linear4bit import Linear4bit
from .quantize import DEFAULT_BLOCKSIZE, DEFAULT_SKIP, should_quantize
from .safetensors_io import SafetensorsReader, save_file

log = logging.getLogger(__name__)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype | None) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        old = owner._parameters[attr]
        if tuple(old.shape) != tuple(value.shape):
            raise QuantizationError(
                f"{key!r}: checkpoint shape {tuple(value.shape)} != model shape {tuple(old.shape)}"
            )
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = value


def load_quantized(
    path: str | Path,
    task: str = "causal-lm",
    skip_modules: Iterable[str] = DEFAULT_SKIP,
    compute_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    num_labels: int | None = None,
    model_cls=None,
    trim_heap: bool = False,
) -> nn.Module:
    """Load the Hugging Face model in folder `path` with its linear layers in NF4 (see module doc).

    `dtype` converts the full-precision tensors (default: as stored). Keys the checkpoint lacks
    (a new classification head) are initialized the way transformers does it and kept in full
    precision. `trim_heap` hands each layer's freed temporaries back to the OS (glibc; measured
    on SmolLM2-135M: the peak was ~230 MB over the live tensors without it, about one layer with
    it). Raises `ConfigError` for an unknown task, `QuantizationError` for a folder without
    safetensors weights or a checkpoint that does not fit the model.
    """
    import transformers

    path = Path(path)
    reader = SafetensorsReader(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:  # no config.json, or one transformers cannot read
        raise QuantizationError(f"{path}: cannot read the model's config.json ({e})") from None
    prequantized = getattr(config, "quantization_config", None) is not None
    config.quantization_config = None  # the 4-bit layers are ours; keep transformers' quantizer out
    if num_labels is not None:
        config.num_labels = num_labels
    cls = model_cls or auto_model_class(task)
    release = release_freed_memory if trim_heap else None
    with torch.device("meta"):
        model = cls.from_config(config)
    keys = _key_map(model, reader.keys())
    tied = tied_heads(model)
    missing = {k for k in model.state_dict() if k not in keys.values()}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name or name in tied:
            continue
        has_4bit = f"{name}.weight.quant_state.bitsandbytes__nf4" in keys.values()
        fresh = f"{name}.weight" in missing  # a new head: trained, so never quantized
        if has_4bit or (not prequantized and not fresh and should_quantize(name, module, skip_modules, tied)):
            layer = Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=compute_dtype,
                blocksize=blocksize,
                double_quant=double_quant,
                weight_dtype=dtype or torch.float32,
                device="meta",
            )
            replace_module(model, name, layer)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    by_module: dict[str, dict[str, str]] = {}
    for file_key, key in keys.items():
        owner, local = _owner(key)
        if owner in quantized:
            by_module.setdefault(owner, {})[local] = file_key
        else:
            _set_tensor(model, key, reader.get(file_key), dtype)
    for name, layer in quantized.items():
        tensors = {
            k: _cast(reader.get(fk), dtype) if k in ("weight", "bias") else reader.get(fk)
            for k, fk in by_module.get(name, {}).items()
        }
        if not tensors:
            raise QuantizationError(f"checkpoint in {path} has no weight for {name!r}")
        layer.load_state_dict(tensors)  # quantizes a full-precision weight here, then drops it
        del tensors
        if release is not None:  # glibc keeps the freed per-layer temporaries resident otherwise
            release()
    _finish(model, missing)
    return model.eval()


def _owner(key: str) -> tuple[str, str]:
    """Split a tensor name into (module, local name): `a.b.weight.absmax` -> (`a.b`, `weight.absmax`)."""
    if ".weight." in key:
        i = key.rindex(".weight.")
        return key[:i], key[i + 1 :]
    owner, _, local = key.rpartition(".")
    return owner, local


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _key_map(model: nn.Module, file_keys: Iterable[str]) -> dict[str, str]:
    """checkpoint key -> model key, allowing for the base-model prefix (`model.`) on either side."""
    wanted = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for k in file_keys:
        owner, local = _owner(k)
        param = f"{owner}.{local.split('.', 1)[0]}" if owner else local
        for add, strip in (("", ""), (prefix + ".", ""), ("", prefix + ".")):
            if param.startswith(strip) and add + param.removeprefix(strip) in wanted:
                out[k] = add + k.removeprefix(strip)
                break
        else:
            log.warning("checkpoint key %r matches nothing in the model; ignored", k)
    return out


def _finish(model: nn.Module, missing: set[str]) -> None:
    """Tie weights, and create what the checkpoint did not hold (rotary buffers, a new head)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, module in model.named_modules():
        meta = [
            n
            for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            if t is not None and t.device.type == "meta"
        ]
        if not meta:
            continue
        for attr in meta:
            t = getattr(module, attr)
            new = torch.empty_like(t, device="cpu")
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(new, requires_grad=t.requires_grad)
            else:
                module._buffers[attr] = new
        params = [f"{name}.{a}" if name else a for a in meta if a in module._parameters]
        if params:
            log.warning("weights not in the checkpoint, newly initialized: %s", params)
        if not hasattr(model, "_init_weights"):
            raise QuantizationError(
                f"checkpoint misses {params or meta} of {name!r} and the model cannot init them"
            )
        model._init_weights(module)


def save_quantized(model: nn.Module, folder: str | Path) -> None:
    """Save `model` (with `Linear4bit` layers) as `model.safetensors` in bitsandbytes' 4-bit form,
    plus config.json carrying the bitsandbytes `quantization_config` for a Hugging Face model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    tied = tied_heads(model)
    for name in tied:  # tied heads are stored once, as transformers does
        state.pop(f"{name}.weight", None)
    save_file(state, folder / "model.safetensors")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    cfg = config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": bool(layers and layers[0].double_quant),
        "bnb_4bit_compute_dtype": str(layers[0].compute_dtype if layers else torch.float32).removeprefix(
            "torch."
        ),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        ),
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")
