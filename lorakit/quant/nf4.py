"""NF4 (4-bit NormalFloat) quantization, bit-compatible with bitsandbytes.

Pure functions on tensors (no model needed):

    packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
    w_hat = dequantize_nf4(packed, state, dtype=None)

The layout is the one bitsandbytes stores (and verified byte for byte against it in the tests):

- `w` is flattened and cut in blocks of `blocksize` values (the last block may be shorter); each
  block is divided by its absolute maximum (fp32) and each value is rounded to the nearest of the 16
  NF4 code values, a value exactly between two codes going to the lower one.
- Two 4-bit codes per byte, the first element in the HIGH nibble; `packed` is uint8 of shape
  `[(n + 1) // 2, 1]`.
- Double quantization (QLoRA): the fp32 block maxima, minus their mean (`offset`), are quantized
  again to 8 bits with bitsandbytes' signed dynamic map, in blocks of 256 with an fp32 scale each.
  That costs 8 + 32/256 bits per 64 weights instead of 32, so ~4.127 bits per parameter overall.

Supported inputs: float32, float16 and bfloat16 (what bitsandbytes supports); other dtypes raise
`QuantizationError` rather than silently converting (float64 would lose precision unnoticed, ints
are not weights). Block sizes: 32 .. 4096, powers of two (bitsandbytes' set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import QuantizationError

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements quantize_nf4 processes per step (a multiple of every blocksize): bounds its fp32
# temporaries for big layers. Not smaller: per-op overhead (thread sync) dominates tiny chunks.
_CHUNK = 1 << 20
# Bytes dequantize_nf4 decodes per step into bf16/fp16 or into out=: its fp32 scratch (2 values a
# byte, 1 MiB) stays in cache (measured faster than 2**15 and 2**16 on the 2-core build machine).
_DECODE_CHUNK = 1 << 17

# Decision boundaries: bitsandbytes rounds with bucketize over the fp32 midpoints (ties go down).
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
# One byte -> its two code values (high nibble first), stored as one int64 so a single gather
# decodes a byte (both nibbles at once, no shift/mask temporaries); gathering 8-byte items is ~3x
# faster on CPU than two 4-byte lookups.
_PAIR_LUT = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], 1).contiguous()
_PAIR_LUT64 = _PAIR_LUT.view(torch.int64).view(-1)


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 sorted fp32 values in [-1, 1]).

    Rebuilt here (same arithmetic, same float32 rounding) so lorakit does not import bitsandbytes;
    the test suite checks it equals `bitsandbytes.functional.create_dynamic_map(signed=True)`.
    """
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


DYNAMIC_MAP = dynamic_map_8bit()


@dataclass
class NF4State:
    """What it takes to undo `quantize_nf4` (bitsandbytes' `QuantState`, as plain tensors).

    Without double quantization `absmax` is the fp32 scale of each block. With it, `absmax` is
    uint8 (codes into `nested_code`), and a block's scale is
    `nested_code[absmax[i]] * nested_absmax[i // nested_blocksize] + offset`.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code: torch.Tensor = field(default_factory=lambda: NF4_CODE.clone())
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        """Whether the block scales are double-quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of values of the original tensor."""
        return int(np.prod(self.shape, dtype=np.int64)) if len(self.shape) else 1

    @property
    def num_blocks(self) -> int:
        """Number of quantization blocks (the last one may be shorter)."""
        return -(-self.numel // self.blocksize)

    def scales(self) -> torch.Tensor:
        """The fp32 scale of every block (double quantization undone the way bitsandbytes does it)."""
        if not self.nested:
            return self.absmax.float()
        nested_code = (DYNAMIC_MAP if self.nested_code is None else self.nested_code).to(self.absmax.device)
        q = nested_code[self.absmax.long()]
        blocks = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: q.numel()]
        # two separate fp32 ops (no fused multiply-add), like bitsandbytes, so results are identical
        return (q * blocks) + torch.tensor(self.offset, dtype=torch.float32, device=q.device)

    def nbytes(self) -> int:
        """Bytes the state occupies (excluding the shared code tables)."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.nested:
            total += self.nested_absmax.numel() * 4 + 4
        return total

    def to(self, device: torch.device | str) -> NF4State:
        """A copy of the state with its tensors on `device`."""
        return NF4State(
            absmax=self.absmax.to(device),
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            code=self.code.to(device),
            nested_absmax=None if self.nested_absmax is None else self.nested_absmax.to(device),
            nested_code=None if self.nested_code is None else self.nested_code.to(device),
            offset=self.offset,
            nested_blocksize=self.nested_blocksize,
        )

    def validate(self, packed: torch.Tensor | None = None, name: str = "weight") -> None:
        """Check the state is self-consistent (and fits `packed`); raise `QuantizationError` naming
        the part that is wrong."""
        check_blocksize(self.blocksize)
        if self.dtype not in SUPPORTED_DTYPES:
            raise QuantizationError(
                f"{name}: quant state dtype {self.dtype} is not one of {SUPPORTED_DTYPES}"
            )
        want = self.num_blocks
        if self.absmax.dim() != 1 or self.absmax.numel() != want:
            raise QuantizationError(
                f"{name}.absmax has {self.absmax.numel()} values but shape {tuple(self.shape)} with "
                f"blocksize {self.blocksize} needs {want}; the quant state does not belong to this weight"
            )
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise QuantizationError(
                    f"{name}.absmax must be uint8 with double quantization, got {self.absmax.dtype}"
                )
            want2 = -(-want // self.nested_blocksize)
            if self.nested_absmax.numel() != want2:
                raise QuantizationError(
                    f"{name}.nested_absmax has {self.nested_absmax.numel()} values, expected {want2} "
                    f"({want} block scales in blocks of {self.nested_blocksize})"
                )
            if self.nested_code is not None and self.nested_code.numel() != 256:
                raise QuantizationError(
                    f"{name}.nested_quant_map must have 256 values, got {self.nested_code.numel()}"
                )
            if self.offset is None:
                raise QuantizationError(f"{name}: double-quantized state has no offset (nested_offset)")
        elif not self.absmax.is_floating_point():
            raise QuantizationError(
                f"{name}.absmax must be float without double quantization, got {self.absmax.dtype}"
            )
        if self.code.numel() != 16:
            raise QuantizationError(f"{name}.quant_map must have 16 values (NF4), got {self.code.numel()}")
        if packed is not None and packed.numel() != (self.numel + 1) // 2:
            raise QuantizationError(
                f"{name} holds {packed.numel()} packed bytes but its quant state shape {tuple(self.shape)} "
                f"needs {(self.numel + 1) // 2}; the weight and its quant state do not match"
            )


def check_blocksize(blocksize: int) -> None:
    """Raise `QuantizationError` unless `blocksize` is one bitsandbytes supports."""
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(
            f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' set), got {blocksize!r}"
        )


def _block_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], with bitsandbytes' exact arithmetic:
    full blocks multiply by the reciprocal, the short tail block divides (and its max is clamped)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1).view(-1)
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (tail / tail_max).clamp_(-1, 1)])
    return absmax, scaled


def _dynamic_lut() -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantizer does not search the code book: it maps a value in [-1, 1]
    to one of 65536 evenly spaced bins and looks the bin's code up in this table (built with fp32
    arithmetic). Rebuilt the same way so the nested absmax codes match it byte for byte; the result
    is the nearest code except within ~1e-5 of a midpoint."""
    f32 = np.float32
    code = DYNAMIC_MAP.numpy()
    midpoints = f32(0.5) * (code[:-1] + code[1:])
    bins = f32(-1.0) + (f32(2.0) * np.arange(65536, dtype=f32)) / f32(65535)
    return np.searchsorted(midpoints, bins, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut()


def _quantize_8bit_dynamic(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise 8-bit quantization with the dynamic map (its CPU kernel's exact fp32
    steps): returns (uint8 codes, fp32 block absmax). An all-zero block stores code 0."""
    f32 = np.float32
    xs = x.detach().float().cpu().numpy()
    n = xs.size
    pad = -n % blocksize
    blocks = np.concatenate([xs, np.zeros(pad, f32)]).reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1)  # zero padding never raises a block's max
    inv = f32(1.0) / np.where(absmax == 0, f32(1.0), absmax)
    v = np.clip(blocks * inv[:, None], f32(-1.0), f32(1.0))
    t = ((v + f32(1.0)) * f32(0.5)) * f32(65535) + f32(0.5)
    codes = _DYNAMIC_LUT[t.astype(np.int32)]
    codes[absmax == 0] = 0
    out = torch.from_numpy(codes.reshape(-1)[:n].copy()).to(x.device)
    return out, torch.from_numpy(absmax).to(x.device)


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, NF4State]:
    """Quantize `w` to NF4; returns `(packed, state)` with `packed` uint8 `[(n + 1) // 2, 1]`.

    Same bytes and scales as `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4",
    blocksize=blocksize, compress_statistics=double_quant)`. Raises `QuantizationError` for an
    unsupported dtype or block size, an empty tensor, or non-finite values.
    """
    if not isinstance(w, torch.Tensor):
        raise QuantizationError(f"quantize_nf4 needs a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise QuantizationError(
            f"quantize_nf4 supports float32, float16 and bfloat16 weights, got {w.dtype}; "
            "convert the weight first (e.g. w.float())"
        )
    check_blocksize(blocksize)
    if w.numel() == 0:
        raise QuantizationError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    bounds = _NF4_BOUNDS.to(flat.device)
    # In chunks: the fp32 temporaries stay small and same-sized, so quantizing layer after layer
    # (as the streaming loader does) reuses memory instead of growing the heap.
    for start in range(0, n, _CHUNK):
        end = min(start + _CHUNK, n)
        part_max, scaled = _block_absmax(flat[start:end].float(), blocksize)
        absmax[start // blocksize : start // blocksize + part_max.numel()] = part_max
        if scaled.numel() % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
        packed[start // 2 : start // 2 + q.numel() // 2, 0] = (q[0::2] << 4) | q[1::2]
    if not torch.isfinite(absmax).all():
        raise QuantizationError("weight contains NaN or inf; NF4 cannot represent it (fix the weights first)")
    state = NF4State(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        state.absmax, state.nested_absmax = _quantize_8bit_dynamic(absmax - offset, NESTED_BLOCKSIZE)
        state.nested_code = DYNAMIC_MAP.clone()
        state.offset = float(offset)
    return packed, state


def _decode_chunk(codes: torch.Tensor, scratch: np.ndarray) -> torch.Tensor:
    """The fp32 code values of packed bytes (two per byte, high nibble first), in `scratch`'s
    memory on CPU (a fresh tensor on other devices)."""
    if codes.device.type == "cpu":
        # numpy's take with uint8 indices needs no index conversion, and writes into the reused
        # scratch: the fastest gather on CPU, and no allocation per chunk. mode="clip" (a byte is
        # always a valid index of the 256 pairs): with the default "raise", take buffers `out`
        # and runs ~10x slower (measured 1.79 ms vs 0.17 ms for 128K bytes)
        pairs = np.take(_PAIR_LUT64.numpy(), codes.numpy(), out=scratch[: codes.numel()], mode="clip")
        return torch.from_numpy(pairs).view(torch.float32)
    return _PAIR_LUT64.to(codes.device)[codes.long()].view(torch.float32)


# numpy storage for CPU results: numpy asks for transparent huge pages on big arrays, so a fresh
# weight-sized result is faulted in ~3.5x faster than torch.empty's (measured: 67 MB fp32, 16 ms vs
# 54 ms); bf16 has no numpy dtype, so its bits are allocated as int16
_NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def _empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu" or dtype not in _NUMPY_STORAGE:
        return torch.empty(shape, dtype=dtype, device=device)
    n = int(np.prod(shape, dtype=np.int64))
    return torch.from_numpy(np.empty(n, dtype=_NUMPY_STORAGE[dtype])).view(dtype).view(shape)


def _scale_(values: torch.Tensor, scales: torch.Tensor, block: int, bs: int) -> torch.Tensor:
    """Multiply decoded fp32 codes in place by their blocks' scales (`values` starts at block
    `block`; its last block may be short)."""
    m = values.numel()
    full = m - m % bs
    if full:
        values[:full].view(-1, bs).mul_(scales[block : block + full // bs])
    if full < m:
        values[full:].mul_(scales[block + full // bs])
    return values


def dequantize_nf4(
    packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Undo `quantize_nf4`: a tensor of `state.shape` in `dtype` (default: the original dtype),
    written into `out` when given (a contiguous tensor of that shape and dtype, e.g. a buffer reused
    from layer to layer).

    Each value is code * scale in fp32 rounded once to `dtype`, as bitsandbytes computes it, so
    results are identical to `bitsandbytes.functional.dequantize_4bit`. The bytes are decoded in
    chunks that stay in cache and are written straight into the result, so no weight-sized fp32
    copy is made for a bf16/fp16 result.
    """
    dtype = state.dtype if dtype is None else dtype
    n, bs = state.numel, state.blocksize
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        raise QuantizationError(f"packed NF4 weight must be uint8, got {flat.dtype}")
    whole = out is None and dtype == torch.float32 and flat.device.type == "cpu"
    if out is None and not whole:
        out = _empty(state.shape, dtype, flat.device)
    elif out is not None and (out.shape != state.shape or out.dtype != dtype or not out.is_contiguous()):
        raise QuantizationError(
            f"dequantize_nf4 out= must be a contiguous {dtype} tensor of shape {tuple(state.shape)}, "
            f"got {out.dtype} {tuple(out.shape)}"
        )
    scales = state.scales().unsqueeze(1)
    # the codes are copied (never .numpy() on `packed` itself: that pins its storage, and FSDP2
    # frees a gathered 4-bit weight by resizing its storage to 0)
    if whole:
        # fp32: one gather over the whole weight into numpy's (huge-page) memory, one multiply in
        # place: measured faster than chunks (per-chunk overhead) when nothing needs converting
        values = torch.from_numpy(_PAIR_LUT64.numpy()[flat.clone().numpy()]).view(torch.float32)[:n]
        _scale_(values, scales, 0, bs)
        return values.view(state.shape)
    values = out.view(-1)
    codes = torch.empty(min(_DECODE_CHUNK, flat.numel()), dtype=torch.uint8, device=flat.device)
    scratch = np.empty(codes.numel(), dtype=np.int64)
    in_place = dtype == torch.float32 and flat.device.type == "cpu"
    for first in range(0, n, 2 * _DECODE_CHUNK):  # `first`: a multiple of every block size
        m = min(2 * _DECODE_CHUNK, n - first)  # values in this chunk
        part = codes[: (m + 1) // 2]
        part.copy_(flat[first // 2 : first // 2 + part.numel()])
        if in_place and m % 2 == 0:  # fp32: decode into the result itself, scale it there in cache
            _decode_chunk(part, values[first : first + m].view(torch.int64).numpy())
            _scale_(values[first : first + m], scales, first // bs, bs)
            continue
        decoded = _decode_chunk(part, scratch)[:m]
        # fp32 products in the cache-sized scratch, then one rounding into the result
        values[first : first + m].copy_(_scale_(decoded, scales, first // bs, bs))
    return out


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of a weight of `numel` elements in NF4 as `quantize_nf4` stores it: 4-bit codes plus
    the per-block absmax scales.

    Without double quantization each block of `blocksize` has an fp32 absmax (0.5 bit/param at 64);
    with it the absmax are 8-bit codes plus an fp32 scale per `NESTED_BLOCKSIZE` of them and one
    fp32 offset (about 0.127 bit/param), as QLoRA and bitsandbytes store them.
    """
    codes = (numel + 1) // 2
    blocks = -(-numel // blocksize)
    if not double_quant:
        return codes + 4 * blocks
    return codes + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4
