"""Put a model's linear layers in 4-bit: in place, or while reading a checkpoint.

    quantize_model(model, skip_modules=DEFAULT_SKIP, compute_dtype=None, blocksize=64,
                   double_quant=True) -> model
        Replace every `nn.Linear` of an already-loaded model by a `Linear4bit`, one layer at a
        time (each full-precision weight is freed, and the freed heap trimmed, as soon as its
        layer is quantized).

    load_quantized(path, task="causal-lm", skip_modules=DEFAULT_SKIP, compute_dtype=torch.float32,
                   dtype=None, blocksize=64, double_quant=True, num_labels=None, model_cls=None) -> model
        Build a Hugging Face model from `path` (a folder with config.json and *.safetensors) on the
        meta device, swap its linear layers for empty `Linear4bit`s, then read the checkpoint one
        tensor at a time, quantizing each linear weight as it arrives. Peak memory is about the
        4-bit model + the full-precision layers (embeddings, norms, head) + one linear weight.
        A checkpoint that transformers + bitsandbytes saved in 4-bit (`weight.absmax`, ...,
        `weight.quant_state.bitsandbytes__nf4`) is read as it is, without re-quantizing.

    save_quantized(model, folder) -> None
        Write `model.safetensors` (4-bit layers in bitsandbytes' form) and, for a Hugging Face
        model, config.json with the matching `quantization_config`, which transformers +
        bitsandbytes and `load_quantized` read back.

What stays in full precision follows QLoRA: embeddings and norms (they are not `nn.Linear`), and
the modules named in `skip_modules` (default: the output heads `lm_head`, `score`, `classifier`).
An output head tied to the input embeddings is never quantized, so tying keeps working.
`transformers` is imported only inside `load_quantized` / `save_quantized`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import QuantizationError
from ..heap import release_freed_memory
from ..modeling import HEAD_NAMES, replace_module, tied_heads
from .linear4bit import Linear4bit
from .safetensors_io import SafetensorsReader, save_file

log = logging.getLogger(__name__)

DEFAULT_SKIP = HEAD_NAMES
_TASKS = {"causal-lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification"}


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """A module is skipped if a skip entry is its full name, its last dotted part(s), or a parent."""
    return any(
        name == s or name.endswith("." + s) or name.startswith(s + ".") or f".{s}." in name for s in skip
    )


def _check_quantizable(model: nn.Module) -> None:
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise QuantizationError(
            "the model already has 4-bit (Linear4bit) layers; quantize the original full-precision model instead"
        )
    if any(hasattr(m, "base_layer") and hasattr(m, "lora_A") for m in model.modules()):
        raise QuantizationError(
            "the model already has LoRA layers; quantize the base model first, then inject the adapter"
        )


def _targets(model: nn.Module, skip: Iterable[str]) -> list[str]:
    tied = tied_heads(model)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n and n not in tied and not _skipped(n, skip)
    ]


def quantize_model(
    model: nn.Module,
    skip_modules: Iterable[str] = DEFAULT_SKIP,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
) -> nn.Module:
    """Replace the `nn.Linear` layers of `model` by `Linear4bit`, in place; returns `model`.

    `compute_dtype` defaults to each weight's dtype. Raises `QuantizationError` if the model is
    already quantized or already has LoRA layers (quantize first, then inject).
    """
    _check_quantizable(model)
    names = _targets(model, skip_modules)
    for name in names:
        layer = Linear4bit.from_linear(model.get_submodule(name), compute_dtype, blocksize, double_quant)
        replace_module(model, name, layer)
        release_freed_memory()  # the freed full-precision weight and quantize temporaries
    log.info("quantized %d linear layers to NF4", len(names))
    return model


# streaming load ---------------------------------------------------------------------------------


def _model_class(task: str, model_cls):
    import transformers

    if model_cls is not None:
        return model_cls
    if task not in _TASKS:
        raise QuantizationError(f"task must be one of {sorted(_TASKS)}, got {task!r}")
    return getattr(transformers, _TASKS[task])


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
    blocksize: int = 64,
    double_quant: bool = True,
    num_labels: int | None = None,
    model_cls=None,
) -> nn.Module:
    """Load the Hugging Face model in folder `path` with its linear layers in NF4 (see module doc).

    `dtype` converts the full-precision tensors (default: as stored). Keys the checkpoint lacks
    (a new classification head) are initialized the way transformers does it and kept in full
    precision. Raises `QuantizationError` for a folder without safetensors weights, or a
    checkpoint that does not fit the model.
    """
    import transformers

    path = Path(path)
    reader = SafetensorsReader(path)
    config = transformers.AutoConfig.from_pretrained(path)
    prequantized = getattr(config, "quantization_config", None) is not None
    config.quantization_config = None  # the 4-bit layers are ours; keep transformers' quantizer out
    if num_labels is not None:
        config.num_labels = num_labels
    cls = _model_class(task, model_cls)
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
        if has_4bit or (not prequantized and not fresh and not _skipped(name, skip_modules)):
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
        # glibc keeps the freed per-layer temporaries resident: measured on SmolLM2-135M, the peak
        # was ~230 MB over the live tensors without this, about one layer over them with it
        release_freed_memory()
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
