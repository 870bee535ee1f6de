"""Read a safetensors checkpoint one tensor at a time with plain file reads.

`safetensors.safe_open` memory-maps the file, and every page a read touches stays in the
process's resident memory until the file is closed, so streaming a checkpoint through it makes
peak RSS reach the checkpoint's full-precision size: what 4-bit loading is meant to avoid. The
format is simple (8-byte little-endian header length, a JSON header of name -> dtype, shape,
byte offsets, then the data), so this reader seeks and reads each tensor into its own buffer.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file as _save_file

from ..errors import QuantizationError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """The tensors of a folder's `*.safetensors` files (or of one file), read on demand."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise QuantizationError(
                f"{path}: no .safetensors weights found (only safetensors checkpoints load in 4-bit)"
            )
        self._index: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                try:
                    header = json.loads(fh.read(size))
                except json.JSONDecodeError as e:
                    raise QuantizationError(f"{f}: corrupt safetensors header ({e})") from None
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._index[name] = (f, 8 + size, info)

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._index)

    def get(self, name: str) -> torch.Tensor:
        """Read tensor `name` into fresh memory (no memory map)."""
        path, base, info = self._index[name]
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise QuantizationError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        out = torch.empty(info["shape"], dtype=dtype)
        if end > start:
            with open(path, "rb") as fh:
                fh.seek(base + start)
                read = fh.readinto(out.view(-1).view(torch.uint8).numpy())
            if read != end - start:
                raise QuantizationError(f"{path}: tensor {name!r} is truncated; the file is corrupt")
        return out


def save_file(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `tensors` to a safetensors file (thin wrapper, so callers import one module)."""
    _save_file(tensors, str(path), metadata={"format": "pt"})
