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
            for name, info in _read_header(f).items():
                self._index[name] = (f, info.pop("base"), info)

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._index)

    def get(self, name: str) -> torch.Tensor:
        """Read tensor `name` into fresh memory (no memory map)."""
        path, base, info = self._index[name]
        start, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
        if end > start:
            with open(path, "rb") as fh:
                fh.seek(base + start)
                read = fh.readinto(out.view(-1).view(torch.uint8).numpy())
            if read != end - start:
                raise QuantizationError(f"{path}: tensor {name!r} is truncated; the file is corrupt")
        return out


def _read_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets, base}, every entry checked against the file's size, so
    a corrupt header is a `QuantizationError` naming the file and tensor, never a crash or a huge
    allocation."""
    size_on_disk = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        (size,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if size is None or size > size_on_disk - 8:
            raise QuantizationError(
                f"{path}: not a safetensors file (its header length does not fit the file)"
            )
        raw = fh.read(size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise QuantizationError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise QuantizationError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size_on_disk - 8 - size
    for name, info in header.items():
        problem = _entry_problem(info, data_size)
        if problem:
            raise QuantizationError(f"{path}: tensor {name!r} {problem}; the file is corrupt")
        info["base"] = 8 + size
    return header


def _entry_problem(info: object, data_size: int) -> str | None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return "has no valid dtype/shape/data_offsets entry"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        return f"has unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"has an invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        return f"has invalid data_offsets {offsets!r}"
    start, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= start <= end <= data_size or end - start != numel * _DTYPES[dtype].itemsize:
        return f"data_offsets {offsets} do not fit its shape {shape} and {dtype} within the file"
    return None


def save_file(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `tensors` to a safetensors file (thin wrapper, so callers import one module)."""
    _save_file(tensors, str(path), metadata={"format": "pt"})
