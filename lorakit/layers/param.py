"""LoRA on a module's parameter (PEFT's `target_parameters`): MoE experts held as 3-D tensors, a
router's weight, any 2-D or 3-D `nn.Parameter`.

One wrapper adapts one parameter of the module it wraps. Several parameters of one module nest
wrappers, the first registered innermost, as PEFT does, so the saved names are PEFT's:
`mlp.experts.base_layer.lora_A.weight` (`gate_up_proj`), `mlp.experts.lora_A.weight` (`down_proj`).

Shapes (PEFT's `ParamWrapper`):
- 2-D `[out, in]`, a linear weight: A `[r, in]`, B `[out, r]`, delta = s * B @ A.
- 3-D `[E, out, in]` (transformers' experts: expert e computes `x @ W[e].T`; `[E, in, out]` when the
  module says `is_transposed`): A is `[E*r, in]` with expert e's rows at `e*r : (e+1)*r`, B is
  `[out, E*r]` with expert e's columns at `e, e+E, e+2E, ...`; delta[e] = s * B_e @ A_e.

Forward: the wrapped module runs with the parameter replaced by `W + delta`
(`torch.func.functional_call`), so model code that indexes or slices it sees the adapted weight and
the gradient reaches A and B. The input never meets A directly, so dropout cannot act on it (PEFT
refuses `lora_dropout` here too), and a batch must use one adapter on these layers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..errors import AdapterStateError, ConfigError
from .base import LoraLayer


def param_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, experts: int, transposed: bool):
    """`scaling * B @ A` in the parameter's layout: `[out, in]` for one expert, else `[E, out, in]`
    (`[E, in, out]` when `transposed`), from PEFT's packed A `[E*r, in]` and B `[out, E*r]`."""
    if experts == 1:
        return (lora_b @ lora_a) * scaling
    lhs, rhs = _factors(lora_a, lora_b, experts)
    delta = torch.bmm(lhs, rhs) * scaling
    return delta.transpose(1, 2) if transposed else delta


def _factors(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert B `[E, out, r]` and A `[E, r, in]` from the packed matrices."""
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, experts).permute(2, 0, 1)
    return b, a


class LoraParam(LoraLayer):
    """Wraps the module holding parameter `parameter_name` (or another `LoraParam` around it)."""

    adapter_containers = ("lora_A", "lora_B")
    per_token = False  # one adapted parameter per forward: no mixed batches at all

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        path, owner = [], base_layer
        while isinstance(owner, LoraParam):  # nested: the parameter lives on the innermost module
            path.append("base_layer")
            owner = owner.base_layer
        if not isinstance(owner._parameters.get(parameter_name), nn.Parameter):
            raise ConfigError(f"{type(owner).__name__} has no parameter {parameter_name!r} to adapt")
        self._path = ".".join([*path, parameter_name])  # the parameter's name inside base_layer
        shape = self.param.shape
        if len(shape) not in (2, 3):
            raise ConfigError(
                f"target parameter {parameter_name!r} has shape {list(shape)}: LoRA adapts 2-D "
                "(a linear weight) or 3-D (stacked experts) parameters only"
            )
        self.transposed = len(shape) == 3 and bool(getattr(owner, "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        out, inp = shape[-2:] if len(shape) == 2 or not self.transposed else shape[:0:-1]
        self.out_features, self.in_features = int(out), int(inp)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def param(self) -> nn.Parameter:
        """The adapted parameter (the base value, without any adapter)."""
        return self.base_layer.get_parameter(self._path)

    def update_layer(self, adapter: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, *args, **kw):
        if lora_dropout:
            raise ConfigError(
                f"lora_dropout={lora_dropout} cannot apply to target_parameters ({self.parameter_name}): "
                "the input never meets A alone (PEFT refuses it too); set lora_dropout=0"
            )
        super().update_layer(adapter, r, lora_alpha, lora_dropout, *args, **kw)

    def _adapter_dtype(self) -> torch.dtype:
        dtype = self.param.dtype
        return dtype if dtype in (torch.float32, torch.float64) else torch.float32

    def _create_adapter(self, adapter: str, r: int) -> None:
        dtype, e = self._adapter_dtype(), self.num_experts
        self.lora_A[adapter] = nn.Linear(self.in_features, r * e, bias=False, dtype=dtype)
        self.lora_B[adapter] = nn.Linear(r * e, self.out_features, bias=False, dtype=dtype)

    def _delta(self, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        return param_delta(lora_a, lora_b, self.scaling[adapter], self.num_experts, self.transposed)

    def _add_to_base(self, delta: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.param.add_(delta.to(self.param.dtype))

    def forward(self, *args, **kwargs):
        # routed rows are not checked against the input: experts see the tokens flattened
        mine = None if self._route is None else {n if n in self.r else None for n in self._route.in_use}
        names = self._lora_active() if mine is None else [n for n in mine if n is not None]
        if mine is not None and len(mine) > 1:
            raise AdapterStateError(
                f"a mixed-adapter batch reached the adapted parameter {self.parameter_name!r}: "
                "this layer takes one adapter per batch; split the batch by adapter"
            )
        if not names:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, self._swapped(names), args, kwargs)

    def _swapped(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors the base runs with (name inside `base_layer` -> adapted value)."""
        return {self._path: self._adapted(names)}

    def _adapted(self, names: list[str]) -> torch.Tensor:
        """`W + sum of the adapters' deltas`, one fused multiply-add per adapter, in W's dtype."""
        w = self.param
        for name in names:
            a = self.lora_A[name].weight.to(w.dtype)
            b = self.lora_B[name].weight.to(w.dtype)
            s = self.scaling[name]
            if self.num_experts == 1:
                w = torch.addmm(w, b, a, alpha=s)
            else:
                lhs, rhs = _factors(a, b, self.num_experts)
                if self.transposed:
                    lhs, rhs = rhs.transpose(1, 2), lhs.transpose(1, 2)
                w = torch.baddbmm(w, lhs, rhs, alpha=s)
        return w

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, {super().extra_repr()}"


class LoraMultiheadAttention(LoraParam):
    """Wraps an `nn.MultiheadAttention` in PEFT's layout: `in_proj_weight` (q, k, v stacked,
    `[3 * embed, embed]`) is adapted here, `out_proj` by a `LoraLinear` put inside `base_layer`
    (saved as `attn.lora_A.weight` and `attn.base_layer.out_proj.lora_A.weight`). The attention reads
    both weights directly, never calling `out_proj`, so both deltas enter through the weights it runs
    with; dropout has no input to act on and is not applied (as in PEFT)."""

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ConfigError(
                "LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (one in_proj_weight), as in PEFT"
            )
        super().__init__(base_layer, "in_proj_weight")
        from .linear import LoraLinear

        # (name inside this wrapper, original): what inject's undo and unload put back
        self.inner_originals = [("base_layer.out_proj", base_layer.out_proj)]
        base_layer.out_proj = LoraLinear(base_layer.out_proj)

    def update_layer(self, adapter: str, r: int, lora_alpha: float, lora_dropout: float = 0.0, *args, **kw):
        LoraLayer.update_layer(self, adapter, r, lora_alpha, lora_dropout, *args, **kw)
        self.base_layer.out_proj.update_layer(adapter, r, lora_alpha, lora_dropout, *args, **kw)

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.base_layer.out_proj.delete_adapter(adapter)

    def _swapped(self, names: list[str]) -> dict[str, torch.Tensor]:
        out_proj = self.base_layer.out_proj
        w = out_proj.base_layer.weight
        for name in names:
            if name in out_proj.r and name not in out_proj.merged_adapters:
                w = w + out_proj.delta_weight(name).to(w.dtype)
        return {**super()._swapped(names), "out_proj.base_layer.weight": w}
