"""LoRA for linear layers: `nn.Linear`, GPT-2's `Conv1D` (weight stored transposed), and any layer
with `in_features`/`out_features` whose forward is `x @ W.T (+ b)` (the 4-bit linear too).

    y = base(x) + scaling * B(A(dropout(x)))      A: [r, in], B: [out, r]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


def linear_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """`scaling * B @ A` in the base weight's layout (`[in, out]` when `fan_in_fan_out`)."""
    delta = (lora_b @ lora_a) * scaling
    return delta.T if fan_in_fan_out else delta


class LoraLinear(LoraLayer):
    """Wraps a linear base layer; see the module docstring for the math."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"  # transformers' GPT-2 layer
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_adapter(self, adapter: str, r: int) -> None:
        dtype = self._adapter_dtype()
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, dtype=dtype)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False, dtype=dtype)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        return linear_delta(
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            self.scaling[adapter],
            self.fan_in_fan_out,
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self._lora_active():
            a = self.lora_A[name].weight
            b = self.lora_B[name].weight
            h = F.linear(self.lora_dropout[name](x.to(a.dtype)), a)
            # one fused kernel for result + scaling * (h @ B.T): cheaper than matmul, scale, add
            out = torch.addmm(
                result.reshape(-1, self.out_features).to(a.dtype),
                h.reshape(-1, h.shape[-1]),
                b.T,
                alpha=self.scaling[name],
            )
            result = out.view(result.shape).to(result.dtype)
        return result
