"""A LoRA adapter as a llama.cpp LoRA GGUF, to apply on the base model's GGUF (`llama-cli --lora`,
`llama-server --lora`, `llama_cpp.Llama(lora_path=...)`).

The file follows what llama.cpp's `convert_lora_to_gguf.py` writes and `llama-adapter.cpp` reads:
`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, the architecture of the
base, and for each adapted weight `<gguf name>.lora_a` (`A`, `[r, in]`) and `.lora_b` (`B`,
`[out, r]`). llama.cpp scales each pair by `alpha / r` (r read from B's shape), so a layer whose
scaling is not `lora_alpha / r` (rsLoRA, `alpha_pattern`) gets that ratio folded into its B. Rows
of B are permuted like the base's q/k rows (`gguf_arch`), since `B @ A` must match the permuted
weight. An embedding adapter is written as llama.cpp's reader expects it: `A` transposed
(`[num_embeddings, r]`), `B` as it is (`[dim, r]`).

What a llama.cpp LoRA cannot hold is refused with a `ConfigError`: DoRA magnitudes, full module
copies (`modules_to_save`), an adapter on an output head that is tied to the embedding (the base
GGUF has no separate head), and more than one active adapter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .. import _state
from ..errors import ConfigError
from ..inject import lora_layers
from ..modeling import tied_embeddings
from .gguf import LORA_TYPES, _StreamWriter, _write_file, check_file_output, qtype
from .gguf_arch import TensorNames, arch_of, gguf_arch_name, permute_rows, qk_heads

log = logging.getLogger(__name__)


def _adapter(model: nn.Module) -> str:
    active = _state.active(model)
    if len(active) != 1:
        raise ConfigError(
            f"a llama.cpp LoRA file holds one adapter; the model has {active or 'none'} active. "
            "Pass one --adapter (several are summed into one by lorakit export)"
        )
    name = active[0]
    config = _state.configs(model)[name]
    if getattr(config, "modules_to_save", None):
        raise ConfigError(
            f"adapter {name!r} has modules_to_save {config.modules_to_save} (full module copies), which a "
            "llama.cpp LoRA cannot hold; export the merged model with --format gguf instead"
        )
    if getattr(config, "use_dora", False):
        raise ConfigError(
            f"adapter {name!r} is DoRA; llama.cpp LoRA files hold plain LoRA only (use --format gguf)"
        )
    return name


def _pairs(model: nn.Module, adapter: str):
    """(HF weight name, A, B) of every layer `adapter` adapts, B scaled to llama.cpp's alpha / r."""
    config = _state.configs(model)[adapter]
    alpha = float(config.lora_alpha)
    tied = tied_embeddings(model)
    tied_head = id(tied[1]) if tied else None
    for name, layer in lora_layers(model):
        if adapter not in layer.r or not layer.r[adapter]:
            continue
        if id(layer) == tied_head:
            raise ConfigError(
                f"adapter {adapter!r} adapts {name}, an output head tied to the embedding; the base GGUF has no "
                "separate head to apply it to. Export the merged model with --format gguf instead"
            )
        if getattr(layer, "lora_magnitude_vector", None):
            raise ConfigError(f"adapter {adapter!r} has DoRA magnitudes on {name}; use --format gguf")
        if layer.lora_bias.get(adapter):
            raise ConfigError(
                f"adapter {adapter!r} has a lora_B bias (lora_bias=True) on {name}, which a llama.cpp LoRA "
                "file cannot hold; use --format gguf (the adapter merged into the model)"
            )
        r = layer.r[adapter]
        fold = layer.scaling[adapter] * r / alpha  # 1.0 unless rsLoRA / alpha_pattern
        if hasattr(layer, "lora_embedding_A"):
            a = layer.lora_embedding_A[adapter].detach().float().T
            b = layer.lora_embedding_B[adapter].detach().float()
        elif hasattr(layer, "lora_A") and hasattr(layer.lora_A[adapter], "weight"):
            a = layer.lora_A[adapter].weight.detach().float()
            b = layer.lora_B[adapter].weight.detach().float()
        else:
            raise ConfigError(
                f"{name} ({type(layer).__name__}): llama.cpp LoRA files hold linear and embedding adapters only"
            )
        yield f"{name}.weight", a, b * fold if fold != 1.0 else b


def export_gguf_lora(
    model: nn.Module, output: str | os.PathLike, type: str = "f32", overwrite: bool = False
) -> Path:
    """Write the model's one active adapter as a llama.cpp LoRA GGUF at `output` (see the module
    docstring). Raises `ConfigError` for what such a file cannot hold, an unknown architecture or
    type, or an existing `output` (unless `overwrite`); `StorageError` when the disk is full."""
    import gguf

    output = Path(output)
    if type not in LORA_TYPES:
        raise ConfigError(f"--type for gguf-lora must be one of {list(LORA_TYPES)}, got {type!r}")
    wanted = qtype(type)
    config = model.config
    arch = arch_of(config)
    check_file_output(output, overwrite)
    adapter = _adapter(model)
    alpha = float(_state.configs(model)[adapter].lora_alpha)
    names = TensorNames(config, arch)
    pairs = list(_pairs(model, adapter))  # rank-sized: small, and checked before anything is written
    if not pairs:
        raise ConfigError(f"adapter {adapter!r} adapts no layer")

    def source():
        for hf_name, a, b in pairs:
            gguf_name = names.gguf_name(hf_name)
            heads = qk_heads(hf_name, config, arch)
            yield f"{gguf_name}.lora_a", lambda a=a: a.numpy()
            yield f"{gguf_name}.lora_b", lambda b=b, h=heads: (b if h is None else permute_rows(b, h)).numpy()

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(None, gguf_arch_name(arch))
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_name(f"{adapter} (LoRA)")
            _StreamWriter(writer, source, wanted).write(tmp)
        finally:
            writer.close()

    _write_file(output, overwrite, fill)
    log.info("wrote the LoRA adapter %r to %s", adapter, output)
    return output


def read_gguf_lora(path: str | os.PathLike) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(alpha, {gguf weight name: (A, B)}) of a llama.cpp LoRA GGUF, as stored (fp32)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {
        t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        for t in reader.tensors
    }
    pairs = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            pairs[base] = (tensors[name], tensors[base + ".lora_b"])
    return alpha, pairs
