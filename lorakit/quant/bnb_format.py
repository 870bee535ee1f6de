"""The checkpoint form transformers + bitsandbytes use for a 4-bit weight, read and written.

For a weight saved under `name` (e.g. `model.layers.0.self_attn.q_proj.weight`) the tensors are:

    name                                     uint8 [(n + 1) // 2, 1]   packed NF4 codes
    name.absmax                              fp32 [blocks] or uint8 [blocks] (double quant)
    name.quant_map                           fp32 [16]   the NF4 code book
    name.nested_absmax                       fp32 [ceil(blocks / 256)]        (double quant)
    name.nested_quant_map                    fp32 [256]  8-bit dynamic map     (double quant)
    name.quant_state.bitsandbytes__nf4       uint8: UTF-8 JSON with quant_type, blocksize,
                                             dtype, shape, and nested_blocksize, nested_dtype,
                                             nested_offset (double quant)

This is what `bitsandbytes.functional.QuantState.as_dict(packed=True)` produces and `from_dict`
reads; the JSON is written with the same key order and `json.dumps` defaults, so it is byte-equal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from ..errors import QuantizationError
from .nf4 import DYNAMIC_MAP, NF4_CODE, NF4State

QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def state_to_bnb_dict(packed: torch.Tensor, state: NF4State, name: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes saves for a 4-bit weight called `name` (see the module docstring)."""
    meta: dict[str, object] = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    out = {
        name: packed,
        f"{name}.absmax": state.absmax,
        f"{name}.quant_map": state.code.clone().to(packed.device),
    }
    if state.nested:
        out[f"{name}.nested_absmax"] = state.nested_absmax
        nested_code = DYNAMIC_MAP if state.nested_code is None else state.nested_code
        out[f"{name}.nested_quant_map"] = nested_code.clone().to(packed.device)
        meta.update(
            nested_blocksize=state.nested_blocksize, nested_dtype="float32", nested_offset=state.offset
        )
    out[f"{name}.{QUANT_STATE_SUFFIX}"] = torch.tensor(
        list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8, device=packed.device
    )
    return out


def has_bnb_state(keys: object, name: str = "weight") -> bool:
    """Whether `keys` (a mapping or a set of names) holds a bitsandbytes 4-bit state for `name`."""
    return f"{name}.{QUANT_STATE_SUFFIX}" in keys  # type: ignore[operator]


def _need(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise QuantizationError(
            f"4-bit checkpoint is missing {key!r}; the quant state is incomplete or corrupt"
        )
    return tensors[key]


def _read_meta(tensors: Mapping[str, torch.Tensor], name: str) -> dict:
    key = f"{name}.{QUANT_STATE_SUFFIX}"
    if key not in tensors:
        other = [k for k in tensors if k.startswith(f"{name}.quant_state.")]
        if other:
            raise QuantizationError(f"{other[0]!r}: only NF4 is supported (expected {key!r})")
        _need(tensors, key)
    raw = tensors[key]
    try:
        meta = json.loads(bytes(raw.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RuntimeError) as e:
        raise QuantizationError(f"{key!r} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict):
        raise QuantizationError(f"{key!r} must hold a JSON object, got {type(meta).__name__}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise QuantizationError(f"{key!r} has no {field!r}; the quant state is corrupt")
    if meta["quant_type"] != "nf4":
        raise QuantizationError(f"{key!r}: quant_type {meta['quant_type']!r} is not supported (only 'nf4')")
    if meta["dtype"] not in _DTYPES:
        raise QuantizationError(f"{key!r}: dtype {meta['dtype']!r} is not one of {sorted(_DTYPES)}")
    return meta


def state_from_bnb_dict(
    tensors: Mapping[str, torch.Tensor], name: str = "weight", expected_shape: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, NF4State]:
    """Read `(packed, state)` for the weight `name` from bitsandbytes' tensors.

    Raises `QuantizationError` naming the key when one is missing, malformed, or inconsistent
    (wrong shape for `expected_shape`, wrong block size, absmax count that does not fit).
    """
    meta = _read_meta(tensors, name)
    shape = torch.Size(meta["shape"])
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise QuantizationError(
            f"{name}.{QUANT_STATE_SUFFIX}: shape {list(shape)} does not match the layer's weight shape "
            f"{list(expected_shape)}; the checkpoint belongs to another model"
        )
    packed = _need(tensors, name)
    code = _need(tensors, f"{name}.quant_map")
    if code.numel() != 16 or not torch.allclose(code.float().cpu(), NF4_CODE, atol=1e-6):
        raise QuantizationError(f"{name}.quant_map is not the NF4 code book; the checkpoint is corrupt")
    if not isinstance(meta["blocksize"], int):
        raise QuantizationError(
            f"{name}.{QUANT_STATE_SUFFIX}: blocksize must be an integer, got {meta['blocksize']!r}"
        )
    state = NF4State(
        absmax=_need(tensors, f"{name}.absmax"),
        shape=shape,
        dtype=_DTYPES[meta["dtype"]],
        blocksize=meta["blocksize"],
    )
    if "nested_offset" in meta or f"{name}.nested_absmax" in tensors:
        state.nested_absmax = _need(tensors, f"{name}.nested_absmax").float()
        state.nested_code = _need(tensors, f"{name}.nested_quant_map").float()
        if "nested_offset" not in meta:
            raise QuantizationError(
                f"{name}.{QUANT_STATE_SUFFIX} has no nested_offset; the quant state is corrupt"
            )
        state.offset = float(meta["nested_offset"])
        state.nested_blocksize = int(meta.get("nested_blocksize", 256))
        if state.nested_blocksize != 256:
            raise QuantizationError(
                f"{name}.{QUANT_STATE_SUFFIX}: nested_blocksize {state.nested_blocksize} is not supported (256)"
            )
    if packed.dtype != torch.uint8:
        raise QuantizationError(f"{name!r} must be packed uint8 for a 4-bit weight, got {packed.dtype}")
    state.validate(packed, name)
    return packed, state
