"""LoRA for `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`, in PEFT's layout.

A is a convolution with the base's kernel, stride, padding and dilation from `in` to `r` channels,
B a 1x1 convolution from `r` to `out`. Since B is 1x1, B∘A is one convolution whose kernel is
`B @ A` taken per kernel position, which gives the merged delta in one matmul.

A grouped base (`groups` > 1) gets a grouped B (PEFT's layout; r must be a multiple of `groups`).
Its B∘A mixes channels across groups, which no grouped kernel can hold, so such an adapter cannot
be merged (PEFT refuses it too); it trains, saves, loads and unloads like any other.

DoRA: the norm is per output channel (over `in * kernel`), the magnitude saved in PEFT's shape
`[1, out, 1(, 1)]`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterStateError, ConfigError
from .base import LoraLayer


def conv_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`scaling * B∘A` as a kernel of A's shape with B's output channels: `[out, in, *kernel]`."""
    out = lora_b.shape[0]
    return (lora_b.flatten(1) @ lora_a.flatten(1)).view(out, *lora_a.shape[1:]) * scaling


class LoraConv(LoraLayer):
    """Wraps an `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d`; see the module docstring."""

    adapter_containers = ("lora_A", "lora_B")
    supports_lora_bias = True
    per_token = False  # a kernel spans neighbouring positions

    @property
    def supports_dora(self) -> bool:
        # DoRA needs the weight norm of W + B@A, which a grouped B (mixing across groups) has no kernel for
        return self.base_layer.groups == 1

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_adapter(self, adapter: str, r: int) -> None:
        base = self.base_layer
        if r % base.groups:
            raise ConfigError(
                f"rank r={r} is not a multiple of this convolution's groups={base.groups}; PEFT's grouped "
                "LoRA needs one (pick such an r for it with rank_pattern, or exclude the module)"
            )
        conv = type(base)
        dtype = self._adapter_dtype()
        self.lora_A[adapter] = conv(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            dtype=dtype,
        )
        self.lora_B[adapter] = conv(
            r, base.out_channels, 1, 1, groups=base.groups, bias=self.lora_bias[adapter], dtype=dtype
        )

    def _delta(self, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        if self.base_layer.groups > 1:
            raise AdapterStateError(
                f"adapter {adapter!r} is on a grouped convolution (groups={self.base_layer.groups}): its update "
                "mixes channels across groups, so it cannot be merged into the grouped kernel; keep it unmerged"
            )
        return conv_delta(lora_a, lora_b, self.scaling[adapter])

    def _weight_2d(self) -> torch.Tensor:
        return self._base_weight().flatten(1)

    def _ab_2d(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lora_a.flatten(1), lora_b.flatten(1)

    def _feature_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *[1] * (like.dim() - 2))

    def _weight_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *[1] * (self.base_layer.weight.dim() - 1))

    def _magnitude_shape(self, norm: torch.Tensor) -> torch.Tensor:
        return norm.view(1, -1, *[1] * (self.base_layer.weight.dim() - 2))

    def _lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[name]
        return self.lora_B[name](a(x.to(a.weight.dtype))) * self.scaling[name]

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.is_dora(name):
            return self._add_dora(name, x, result)
        x = self.lora_dropout[name](x)
        return result + self._lora_output(name, x).to(result.dtype)
