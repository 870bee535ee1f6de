"""GGUF files for llama.cpp, Ollama and LM Studio, written with the `gguf` package's `GGUFWriter`.

    export_gguf(model, tokenizer, path, type="f16")    the merged model, one .gguf file
    export_gguf_lora(model, path, type="f32")          the active adapter alone (llama.cpp --lora)
    read_gguf_state_dict(path, config)                 a written file back as HF tensors (fp32)

The model is written as it runs: the active adapters merged in (a 4-bit base dequantized first,
never re-quantized to NF4), the tokenizer and chat template in the metadata (`gguf_vocab`), tensor
names and layouts from `gguf_arch`. The writer streams: the header and tensor table are written from
the shapes, then each merged tensor is computed, converted, written and dropped, so memory peaks at
the model plus one layer. The file is built under a temporary name and renamed into place
(`lorakit._atomic`), so a failure (a full disk) leaves nothing under the final name.

Types (`TYPES`): f32, f16, bf16 and the block types the `gguf` package can quantize to (q8_0, q5_1,
q5_0, q4_1, q4_0). 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them; a
matrix whose rows do not split into whole blocks is written f16 instead (logged).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_path, clean_stale
from ..errors import ConfigError, storage_errors
from .gguf_arch import TensorNames, add_hparams, arch_of, from_gguf, gguf_arch_name, to_gguf
from .tensors import merged_tensors

log = logging.getLogger(__name__)

# --type -> (GGMLQuantizationType member, LlamaFileType member)
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
LORA_TYPES = ("f32", "f16", "bf16")


def qtype(name: str):
    """The `gguf.GGMLQuantizationType` of a `--type`; raises `ConfigError` for an unknown one."""
    import gguf

    if name not in TYPES:
        raise ConfigError(f"--type must be one of {list(TYPES)}, got {name!r}")
    return getattr(gguf.GGMLQuantizationType, TYPES[name][0])


def check_file_output(path: Path, overwrite: bool) -> None:
    """Raise `ConfigError` unless `path` may be written: never a folder, an existing file only with
    `overwrite`."""
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder; give the path of the .gguf file to write")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; choose another --output or pass --overwrite")


def tensor_type(shape: tuple[int, ...], wanted):
    """The type a tensor of `shape` is stored in when `wanted` is asked for (see the docstring)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or wanted == T.F32:
        return T.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else T.F16


def encode(array: np.ndarray, kind) -> np.ndarray:
    """`array` (fp32) in GGUF type `kind`: float arrays for F32/F16, bytes for the block types."""
    import gguf

    T = gguf.GGMLQuantizationType
    if kind == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if kind == T.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind)


def _nbytes(shape: tuple[int, ...], kind) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape) // block * size


class _StreamWriter:
    """Two passes over a tensor source: the table from the shapes, then the data one tensor at a time."""

    def __init__(self, writer, tensors, wanted) -> None:
        self.writer, self.tensors, self.wanted = writer, tensors, wanted

    def write(self, path: Path) -> list[str]:
        plan = []
        for name, array_fn in self.tensors():
            shape = tuple(array_fn().shape)
            kind = tensor_type(shape, self.wanted)
            plan.append((name, kind))
            self.writer.add_tensor_info(name, shape, np.float32, _nbytes(shape, kind), raw_dtype=kind)
            if kind != self.wanted and len(shape) > 1:
                log.info(
                    "%s: rows of %d do not split into %s blocks; writing it f16",
                    name,
                    shape[-1],
                    self.wanted.name,
                )
        self.writer.write_header_to_file(path)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()
        for (name, array_fn), (planned, kind) in zip(self.tensors(), plan, strict=True):
            assert name == planned, (name, planned)  # the source must be deterministic
            self.writer.write_tensor_data(encode(array_fn(), kind))
        return [n for n, _ in plan]


def _write_file(path: Path, overwrite: bool, fill) -> None:
    """Build the file with `fill(tmp_path)` under a temporary name, then rename it to `path`."""
    check_file_output(path, overwrite)
    clean_stale(path.parent)
    with storage_errors(path), atomic_path(path) as tmp:
        fill(tmp)


def _model_tensors(model: nn.Module, config, arch):
    names = TensorNames(config, arch)

    def source():
        for hf_name, tensor in merged_tensors(model):
            if not arch.writes(hf_name):
                continue
            gguf_name = names.gguf_name(hf_name)
            yield gguf_name, lambda t=tensor, n=hf_name: to_gguf(n, t, config, arch).numpy()

    return source


def export_gguf(
    model: nn.Module,
    tokenizer,
    output: str | os.PathLike,
    type: str = "f16",
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write `model` with its active adapters merged (the model itself is not changed) and
    `tokenizer` as one GGUF file of `type` (see `TYPES`) at `output`.

    Raises `ConfigError` for an unknown type or architecture, an `output` that is a folder or that
    exists (unless `overwrite`); `StorageError` when the disk is full (nothing is left behind)."""
    import gguf

    from .gguf_vocab import add_tokenizer

    output = Path(output)
    wanted = qtype(type)
    config = model.config
    arch = arch_of(config)
    check_file_output(output, overwrite)

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(None, gguf_arch_name(arch))
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "model")).name)
            add_hparams(writer, config, arch)
            writer.add_file_type(getattr(gguf.LlamaFileType, TYPES[type][1]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if tokenizer is not None:
                add_tokenizer(writer, tokenizer, config)
            _StreamWriter(writer, _model_tensors(model, config, arch), wanted).write(tmp)
        finally:
            writer.close()

    _write_file(output, overwrite, fill)
    log.info("wrote %s (%s)", output, type)
    return output


def read_gguf_state_dict(path: str | os.PathLike, config) -> dict[str, torch.Tensor]:
    """The tensors of a GGUF model file written by `export_gguf`, dequantized (`gguf.quants`) and
    back in Hugging Face names and layouts (fp32): what a runtime reading the file computes with."""
    import gguf

    arch = arch_of(config)
    names = TensorNames(config, arch)
    reader = gguf.GGUFReader(path)
    by_gguf = {}
    for hf_name in _hf_names(config):
        if arch.writes(hf_name):
            by_gguf[names.gguf_name(hf_name)] = hf_name
    state = {}
    for t in reader.tensors:
        hf_name = by_gguf[t.name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        state[hf_name] = from_gguf(
            hf_name, torch.from_numpy(np.array(values, dtype=np.float32)), config, arch
        )
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # llama.cpp's rule for a tied head
    return state


def _hf_names(config) -> list[str]:
    """The tensor names of the plain model `config` describes (built on the meta device)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return list(model.state_dict())
