"""Initialisations of LoRA's A and B that read the base weight: PiSSA, OLoRA and LoftQ, as pure
functions (tensors in, tensors out) with PEFT's definitions, and the dispatcher the linear layers
call (`weight_init`).

`W` below is the base weight as `[out, in]` in fp32; `s` the adapter's scaling.

- PiSSA (`"pissa"`): `W = U S V^T` (exact SVD); `A = diag(sqrt(S_r / s)) V_r^T`, `B = U_r diag(sqrt(S_r
  / s))`, so `s B A` is the best rank-r part of W; the base keeps the residual `W - s B A`.
  `"pissa_niter_N"` uses `torch.svd_lowrank(W, r, niter=N)` (randomised: equal to PEFT's only for
  the same torch random state, since both draw the same Gaussian test matrix from it).
- OLoRA (`"olora"`): `W = Q R` (QR); `A = R[:r]`, `B = Q[:, :r]`; the base keeps `W - s B A`.
- LoftQ (`"loftq"`, `loftq_config={"loftq_bits": 4, "loftq_iter": T}`): alternately quantize the
  residual to NF4 and take the rank-r SVD of what quantization lost, T times; the base becomes the
  NF4 weight of the last quantization, `A = sqrt(S_r) V_r^T`, `B = U_r sqrt(S_r)`. As in PEFT, the
  factors are not divided by the scaling: with `lora_alpha != r`, `s B A` overshoots by `s`.
  PEFT 0.21 quantizes with bitsandbytes' NF4 (its own NF4 was removed in PEFT 0.20) without double
  quantization; `loftq_init` here uses lorakit's NF4, byte for byte bitsandbytes', and
  `double_quant=False` by default to match.

Each raises `ConfigError` for a weight it cannot work on (a 4-bit base for PiSSA/OLoRA: they must
change the full-precision weight; anything but a full-precision `nn.Linear` for LoftQ).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import is_weight_init
from .errors import ConfigError
from .quant.linear4bit import Linear4bit
from .quant.nf4 import NF4State, dequantize_nf4, quantize_nf4

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def pissa_init(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A `[r, in]`, B `[out, r]`, residual `W - s B A`) for the fp32 `[out, in]` weight."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        ur, sr, vhr = u[:, :r], s[:r], vh[:r]
    else:
        ur, sr, v = torch.svd_lowrank(weight, r, niter=niter)
        vhr = v.t()
    sr = sr / scaling
    lora_a = torch.diag(torch.sqrt(sr)) @ vhr
    lora_b = ur @ torch.diag(torch.sqrt(sr))
    return lora_a, lora_b, weight - scaling * lora_b @ lora_a


def olora_init(
    weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A = R[:r], B = Q[:, :r], residual `W - s B A`) from the QR decomposition of the weight."""
    q, rr = torch.linalg.qr(weight)
    lora_a, lora_b = rr[:r].contiguous(), q[:, :r].contiguous()
    return lora_a, lora_b, weight - scaling * lora_b @ lora_a


def low_rank(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L `[out, r]`, R `[r, in]`) with `L @ R` the best rank-r approximation (PEFT's split of S)."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vh[:r]


def loftq_init(
    weight: torch.Tensor, r: int, num_iter: int = 1, blocksize: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, NF4State, torch.Tensor, torch.Tensor]:
    """LoftQ for the fp32 `[out, in]` weight: (packed NF4, its state, A `[r, in]`, B `[out, r]`).

    Iteration t quantizes `W - B_{t-1} A_{t-1}` (W itself first), then A, B = the rank-r SVD of
    `W - dequantize(Q_t)`; the last Q is returned. Raises `ConfigError` if `num_iter < 1`."""
    if num_iter < 1:
        raise ConfigError(f"loftq_config.loftq_iter must be >= 1, got {num_iter}")
    res = weight
    for i in range(num_iter):
        packed, state = quantize_nf4(res, blocksize, double_quant)
        lora_b, lora_a = low_rank(weight - dequantize_nf4(packed, state, torch.float32), r)
        if i + 1 < num_iter:
            res = weight - lora_b @ lora_a
    return packed, state, lora_a, lora_b


def weight_init(
    base: nn.Module, init: str, r: int, scaling: float, fan_in_fan_out: bool, loftq_config: dict
) -> tuple[torch.Tensor, torch.Tensor, nn.Module | None]:
    """(A, B, new base layer or None) for a linear base layer and `init`; PiSSA/OLoRA write the
    residual into `base`'s weight themselves (callers subtract `s B A` from it), LoftQ returns the
    4-bit layer that replaces `base`. Raises `ConfigError` (see the module docstring)."""
    if not is_weight_init(init):
        raise ConfigError(
            f"init_lora_weights={init!r} is unknown; use True, False, 'gaussian', 'pissa', "
            "'pissa_niter_N', 'olora' or 'loftq'"
        )
    if init == "loftq":
        return _loftq_layer(base, r, loftq_config)
    if isinstance(base, Linear4bit):
        raise ConfigError(
            f"init_lora_weights={init!r} needs the full-precision base weight, but the layer is 4-bit; "
            "initialise on the full-precision model (and quantize its residual afterwards)"
        )
    w = base.weight.detach().to(torch.float32)
    w = w.T if fan_in_fan_out else w
    with torch.no_grad():
        if init == "olora":
            a, b, _ = olora_init(w, r, scaling)
        else:
            niter = PISSA_NITER.fullmatch(init)
            a, b, _ = pissa_init(w, r, scaling, int(niter.group(1)) if niter else None)
    return a, b, None


def _loftq_layer(base: nn.Module, r: int, loftq_config: dict) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    if type(base) is not nn.Linear:
        raise ConfigError(
            f"init_lora_weights='loftq' initialises for a 4-bit base and quantizes the layer to NF4 itself, so "
            f"it needs a full-precision nn.Linear; this layer is {type(base).__name__}. Inject LoftQ before "
            "quantizing (not on a 4-bit model), or exclude this module from target_modules"
        )
    w = base.weight.detach()
    with torch.no_grad():
        packed, state, a, b = loftq_init(w.to(torch.float32), r, int(loftq_config.get("loftq_iter", 1)))
    state.dtype = w.dtype
    bias = None if base.bias is None else base.bias.detach()
    return a, b, Linear4bit.from_quantized(packed, state, bias, _compute_dtype(w.dtype))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
