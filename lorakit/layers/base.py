"""State and behaviour shared by every LoRA wrapper: adapters keyed by name.

A wrapper replaces a target module in place and keeps the original as `base_layer`. Each adapter
it carries has a rank, an alpha, a scaling and a dropout, all keyed by the adapter's name, so one
layer holds any number of adapters; `active_adapters` says which of them the forward adds.

The family-specific parts (how A and B are stored, initialised, applied and turned into a weight
delta) live in `linear.py`, `embedding.py` and `conv.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AdapterStateError, ConfigError


class LoraLayer(nn.Module):
    """Base class of the LoRA wrappers. Subclasses implement `_create_adapter`, `_reset_adapter`,
    `delta_weight`, `_adapter_params` and `forward`."""

    # names of the per-adapter containers; io.py uses them to build PEFT's tensor names
    adapter_containers: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # adapter management -----------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter this layer carries, in the order they were added."""
        return list(self.r)

    def update_layer(
        self,
        adapter: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter` with rank `r`; raise `ConfigError` if r <= 0."""
        if r <= 0:
            raise ConfigError(f"rank must be a positive integer, got r={r} for adapter {adapter!r}")
        if adapter in self.merged_adapters:
            raise AdapterStateError(
                f"adapter {adapter!r} is merged into the base weights; unmerge it before replacing it"
            )
        self.r[adapter] = r
        self.lora_alpha[adapter] = lora_alpha
        self.scaling[adapter] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_adapter(adapter, r)
        self._reset_adapter(adapter, init_lora_weights)
        self._to_base_device(adapter)

    def delete_adapter(self, adapter: str) -> None:
        """Remove adapter `adapter` and its weights; refuse if it is merged."""
        if adapter in self.merged_adapters:
            raise AdapterStateError(
                f"adapter {adapter!r} is merged into the base weights; unmerge before deleting it"
            )
        for container in (*self.adapter_containers, "lora_dropout"):
            items = getattr(self, container)
            if adapter in items:
                del items[adapter]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(adapter, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def set_active(self, adapters: list[str]) -> None:
        """Make exactly `adapters` (those this layer carries) active and trainable."""
        self.active_adapters = [a for a in adapters if a in self.r]
        for name in self.r:
            for p in self._adapter_params(name):
                p.requires_grad_(name in self.active_adapters)

    def _adapter_params(self, adapter: str) -> list[nn.Parameter]:
        return [p for c in self.adapter_containers for p in _params_of(getattr(self, c)[adapter])]

    def _adapter_dtype(self) -> torch.dtype:
        """Adapters train in fp32 unless the base is fp32/fp64 already (PEFT's autocast_adapter_dtype)."""
        w = getattr(self.base_layer, "weight", None)
        if isinstance(w, torch.Tensor) and w.dtype in (torch.float32, torch.float64):
            return w.dtype
        return torch.float32

    def _to_base_device(self, adapter: str) -> None:
        device = next((t.device for t in self.base_layer.state_dict().values()), None)
        if device is not None and device.type != "meta":
            for c in self.adapter_containers:
                getattr(self, c)[adapter].to(device)

    # merging ------------------------------------------------------------------------------

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's contribution in the layout of `base_layer.weight` (already scaled)."""
        raise NotImplementedError

    def merge(self, adapters: list[str]) -> None:
        """Add each adapter's delta into the base weight (skipping those already merged)."""
        for name in adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            self._add_to_base(self.delta_weight(name))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters from the base weight, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._add_to_base(-self.delta_weight(name))

    def _add_to_base(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        if hasattr(base, "add_weight_delta_"):  # quantized bases know how to update themselves
            base.add_weight_delta_(delta)
            return
        with torch.no_grad():
            base.weight.add_(delta.to(base.weight.dtype))

    def _lora_active(self) -> list[str]:
        """The active adapters whose output the forward must add (not disabled, not merged)."""
        if self.disabled:
            if self.merged_adapters:
                raise AdapterStateError(
                    f"adapters {self.merged_adapters} are merged into the base weights, so they cannot be "
                    "disabled; call lorakit.unmerge(model) first"
                )
            return []
        return [a for a in self.active_adapters if a not in self.merged_adapters]

    def extra_repr(self) -> str:
        return f"adapters={ {a: self.r[a] for a in self.r} }, active={self.active_adapters}"


def _params_of(obj: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters())


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (Kaiming-uniform, a=sqrt(5)): LoRA's A at init_lora_weights=True."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
