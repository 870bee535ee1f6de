"""`Linear4bit`: a frozen linear layer whose weight is stored in NF4 (QLoRA's base layer).

It holds the packed codes as a frozen uint8 parameter (`weight`, bitsandbytes' `[(n + 1) // 2, 1]`
layout; a parameter so that FSDP2 shards it) plus the quant state buffers. The forward dequantizes the weight into `compute_dtype` (on CPU
into one reused buffer, see `_Workspace`), runs one matmul and keeps no full-precision copy; the
backward (for the input gradient LoRA needs) dequantizes again instead of keeping it, so training
holds at most one layer's full-precision weight at a time. The weight itself never gets a gradient.

Its `state_dict` is in the form transformers + bitsandbytes save 4-bit checkpoints
(`weight`, `weight.absmax`, ..., `weight.quant_state.bitsandbytes__nf4`, see `bnb_format`), and
`load_state_dict` reads that form, or a full-precision `weight`, which it quantizes.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import QuantizationError
from .bnb_format import has_bnb_state, state_from_bnb_dict, state_to_bnb_dict
from .nf4 import NESTED_BLOCKSIZE, NF4_CODE, NF4State, _empty, check_blocksize, dequantize_nf4, quantize_nf4

log = logging.getLogger(__name__)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Workspace(threading.local):
    """Where a CPU forward or backward dequantizes a weight that lives only for one matmul: one
    buffer per dtype and thread (thread-local, so concurrent forwards never share one), grown to the
    largest layer seen and reused from layer to layer.

    A fresh weight-sized tensor per matmul costs more than the decoding itself on CPU: the
    allocator hands large blocks back to the OS when they are freed, so every new one is
    page-faulted in again. The cost is one layer's full-precision weight kept for the process's
    life. On GPUs the caching allocator already reuses memory, so it is not used there.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def weight(self, packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
        """The weight dequantized into `dtype`, in the reused buffer (valid until the next call)."""
        if packed.device.type != "cpu":
            return dequantize_nf4(packed, state, dtype)
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < state.numel:
            buf = self.buffers[dtype] = _empty(torch.Size((state.numel,)), dtype, packed.device)
        return dequantize_nf4(packed, state, dtype, out=buf[: state.numel].view(state.shape))


_WORKSPACE = _Workspace()


class _DequantLinear(torch.autograd.Function):
    """`x @ W.T + b` with W dequantized on the fly, in forward and again in backward.

    Saving W for backward (what F.linear's autograd does) would keep every layer's
    full-precision weight alive until the backward pass, defeating 4-bit storage.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: Linear4bit) -> torch.Tensor:
        ctx.packed, ctx.state = layer.weight, layer.quant_state  # 4-bit tensors only
        ctx.has_bias = bias is not None
        return F.linear(x, _WORKSPACE.weight(ctx.packed, ctx.state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(_WORKSPACE.weight(ctx.packed, ctx.state, grad.dtype))
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None


class Linear4bit(nn.Module):
    """Frozen NF4 linear layer: `y = x @ dequant(W).T + b`, computed in `compute_dtype`.

    Build it with `Linear4bit.from_linear(linear)` or `Linear4bit.from_quantized(packed, state)`;
    the plain constructor makes an empty (all-zero) layer of the right shapes, used when loading.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        blocksize: int = 64,
        double_quant: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_blocksize(blocksize)
        if compute_dtype not in COMPUTE_DTYPES:
            raise QuantizationError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        blocks = -(-n // blocksize)
        empty = NF4State(
            absmax=torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
            shape=torch.Size((out_features, in_features)),
            dtype=weight_dtype,
            blocksize=blocksize,
        )
        if double_quant:
            empty.nested_absmax = torch.zeros(-(-blocks // NESTED_BLOCKSIZE), device=device)
            empty.offset = 0.0
        self._set_state(torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device), empty)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> Linear4bit:
        """Quantize an `nn.Linear` (its weight must be on a real device). `compute_dtype` defaults
        to the weight's dtype (fp16 weights compute in fp16). The bias is kept as it is."""
        if isinstance(linear, Linear4bit):
            raise QuantizationError(
                "layer is already a 4-bit Linear4bit; quantize the original nn.Linear instead"
            )
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"Linear4bit.from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        if w.device.type == "meta":
            raise QuantizationError("cannot quantize a weight on the meta device; load the weights first")
        packed, state = quantize_nf4(w.detach(), blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(packed, state, bias, compute_dtype or _default_compute(w.dtype))

    @classmethod
    def from_quantized(
        cls,
        packed: torch.Tensor,
        state: NF4State,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> Linear4bit:
        """Wrap already-quantized data (e.g. read from a bitsandbytes checkpoint)."""
        if len(state.shape) != 2:
            raise QuantizationError(f"a linear weight must be 2-D, the quant state says {tuple(state.shape)}")
        state.validate(packed)
        out_f, in_f = state.shape
        layer = cls(
            in_f,
            out_f,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            blocksize=state.blocksize,
            double_quant=state.nested,
            weight_dtype=state.dtype,
            device="meta",
        )
        layer._set_state(packed, state)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def _set_state(self, packed: torch.Tensor, state: NF4State) -> None:
        # tensors on the module (not one state object) so .to(), .cuda() and state_dict see them all;
        # the packed codes a frozen parameter (as bitsandbytes' Params4bit is), so FSDP2, which shards
        # parameters only, shards the 4-bit storage with the rest of its layer (uint8 is never cast)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("nested_absmax", state.nested_absmax)
        self.blocksize, self.weight_dtype = state.blocksize, state.dtype
        self.absmax_offset = state.offset

    # the 4-bit weight -----------------------------------------------------------------------

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves quantized (QLoRA's double quantization)."""
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> NF4State:
        """The weight's quant state (views of this layer's buffers)."""
        return NF4State(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            code=NF4_CODE,
            nested_absmax=self.nested_absmax,
            offset=self.absmax_offset,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight `[out, in]` in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def num_quantized_params(self) -> int:
        """Parameters stored in 4 bits (counted by `lorakit.trainable_parameters`)."""
        return self.in_features * self.out_features

    def add_weight_delta_(self, delta: torch.Tensor) -> None:
        """W <- quantize(dequantize(W) + delta): how `lorakit.merge` merges into a 4-bit base.

        Lossy (the sum is re-quantized); `lorakit.quant.merge_to_dense` merges exactly instead.
        """
        log.warning(
            "merging into a 4-bit layer re-quantizes its weight (lossy); "
            "lorakit.quant.merge_to_dense gives an exact full-precision merge"
        )
        w = self.dequantize(torch.float32) + delta.to(device=self.weight.device, dtype=torch.float32)
        self._set_state(*quantize_nf4(w.to(self.weight_dtype), self.blocksize, self.double_quant))

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain `nn.Linear` holding the dequantized weight (and the bias) in `dtype`."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype
        )
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return linear

    # forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)
        )
        if needs_grad:
            y = _DequantLinear.apply(x, bias, self)
        else:  # no autograd graph: plain dequantize + matmul, the weight is freed right after
            y = F.linear(x, _WORKSPACE.weight(self.weight, self.quant_state, self.compute_dtype), bias)
        return y.to(in_dtype)

    # checkpoint form (bitsandbytes') --------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in state_to_bnb_dict(self.weight, self.quant_state, prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        name = prefix + "weight"
        shape = (self.out_features, self.in_features)
        device = None if self.weight.device.type == "meta" else self.weight.device
        if has_bnb_state(state_dict, name):
            tensors = {k: v for k, v in state_dict.items() if k == name or k.startswith(name + ".")}
            packed, state = state_from_bnb_dict(tensors, name, expected_shape=shape)
            self._set_state(packed.to(device), state.to(device or packed.device))
        elif name in state_dict:
            w = state_dict[name]
            if tuple(w.shape) != shape:
                raise QuantizationError(
                    f"{name!r} has shape {tuple(w.shape)}, the 4-bit layer expects {shape}"
                )
            if not w.is_floating_point():
                raise QuantizationError(
                    f"{name!r} is {w.dtype} without a 4-bit quant state; expected a float weight "
                    f"or the bitsandbytes keys ({name}.absmax, ...)"
                )
            self._set_state(*quantize_nf4(w.to(device) if device else w, self.blocksize, self.double_quant))
        else:
            missing_keys.append(name)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                b = state_dict[prefix + "bias"]
                self.bias = nn.Parameter(
                    b.detach().to(device or b.device, self.bias.dtype).clone(), requires_grad=False
                )
            else:
                missing_keys.append(prefix + "bias")
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] not in ("weight", "bias"):
                    unexpected_keys.append(key)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


def _default_compute(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in COMPUTE_DTYPES else torch.float32
