"""State and behaviour shared by every LoRA wrapper: adapters keyed by name.

A wrapper replaces a target module in place and keeps the original as `base_layer`. Each adapter
it carries has a rank, an alpha, a scaling and a dropout, all keyed by the adapter's name, so one
layer holds any number of adapters; `active_adapters` says which of them the forward adds.

The family-specific parts (how A and B are stored, initialised, applied and turned into a weight
delta) live in `linear.py`, `embedding.py` and `conv.py`.

Mixed-adapter batches (`lorakit.mixed`): `route_rows` hands every wrapper one `Routing`, which
says which adapter each batch row uses. A
batch whose rows all use one adapter (on this layer) takes the plain path; otherwise the forward
calls the family's `_mixed_forward`. The default here runs each adapter in use on its own rows (a
loop over adapters, never over rows), which is exact for any family whose adapter acts row by row
(embedding, conv); `LoraLinear` overrides it with batched gathers (BGMV). Routed per token
(`tokens=True`: one packed sequence `[1, N, ...]`, a name per token, as the server's continuous
batching runs it), the forward views the input as N rows of one token each, which is exact for
families whose adapter acts on each token alone (`per_token`; not convolutions).

A merged adapter is frozen (`requires_grad=False`) and a copy of the weights that were merged is
kept (rank-sized, small), so `unmerge` subtracts exactly what was added even if someone changed the
live weights in between.

DoRA (`use_dora=True`, math in `dora.py`) is shared by every family that sets `supports_dora`: the
magnitude vector lives in `lora_magnitude_vector[name]` (in PEFT's shape), the weight norm is
computed without building `W + dW` and cached until the adapter or base weights change (tensor
version counters), and a DoRA merge is `W <- f * (W + dW)` with `f = m / ||W + dW||` (computed for
every adapter of a merge before any weight changes, as the forward sees them); unmerge divides by
the same `f`. The family supplies the layout hooks (`_weight_2d`, `_ab_2d`, `_feature_view`,
`_lora_output`).

Initialisations that read the base weight (PiSSA, OLoRA, LoftQ: `lorakit.init`) are the family's
`_init_from_weight`; the base class refuses them.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import AdapterStateError, ConfigError
from .dora import DoraParts
from .routing import Routing, check_rows, token_rows

log = logging.getLogger(__name__)


class LoraLayer(DoraParts, nn.Module):
    """Base class of the LoRA wrappers. Subclasses implement `_create_adapter`, `_delta` (or
    `delta_weight`) and `_add_adapter`, `_reset_adapter` when their weights are not
    `lora_A`/`lora_B` modules, and `_mixed_forward` when a faster mixed batch is possible."""

    # names of the per-adapter containers; io.py uses them to build PEFT's tensor names
    adapter_containers: tuple[str, ...] = ()
    supports_dora = False  # families that implement the DoRA layout hooks set it
    supports_lora_bias = False  # families whose B can carry a bias (PEFT: linear and conv layers)
    _drops_input = True  # dropout applies to the input (not to an embedding's token ids)
    per_token = True  # the adapter acts on each token alone, so it can be routed per token

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}  # adapters whose lora_B has a bias (PEFT's lora_bias)
        self.lora_dropout = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._merged_weights: dict[str, list[torch.Tensor]] = {}  # what each merge added
        self.disabled = False
        self._route: Routing | None = None  # mixed-adapter batches: each row's adapter
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self._dora_cache: dict[str, tuple] = {}  # name -> (weights' version key, norm)
        self._merged_factors: dict[str, torch.Tensor] = {}  # DoRA: the factor each merge applied
        self._initial: dict[str, tuple] = {}  # PiSSA/OLoRA: (method, A0, B0) for the conversion at save

    # looking like the wrapped layer -------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads `self.proj.weight` (T5 its dtype, for one)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None when it has none)."""
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str):
        # nn.Module keeps parameters and submodules outside __dict__, so its own lookup runs first;
        # what it does not know (in_features, kernel_size, padding_idx, ...) is the base layer's,
        # as model code reading a wrapped layer expects. base_layer itself never falls through.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")  # absent mid-copy/unpickle
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

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
        use_dora: bool = False,
        loftq_config: dict | None = None,
        lora_bias: bool = False,
    ) -> None:
        """Add (or replace) adapter `adapter` with rank `r`; raise `ConfigError` if r <= 0, or for
        DoRA, `lora_bias` or a weight-based init (`"pissa"`, `"olora"`, `"loftq"`) on a layer
        without support."""
        if r <= 0:
            raise ConfigError(f"rank must be a positive integer, got r={r} for adapter {adapter!r}")
        if lora_bias and not self.supports_lora_bias:
            raise ConfigError(
                f"lora_bias=True is not supported on {type(self.base_layer).__name__} layers "
                f"({type(self).__name__}; PEFT has it on linear and convolution layers only); exclude them "
                "from target_modules or set lora_bias=False"
            )
        if lora_bias and self.bias is None:  # PEFT warns too: it trains, but cannot be merged
            log.warning("lora_bias=True on a layer without a bias: adapter %r cannot be merged", adapter)
        if use_dora and not self.supports_dora:
            raise ConfigError(
                f"use_dora=True is not supported on {type(self.base_layer).__name__} layers "
                f"({type(self).__name__}); exclude them from target_modules or set use_dora=False"
            )
        if adapter in self.merged_adapters:
            raise AdapterStateError(
                f"adapter {adapter!r} is merged into the base weights; unmerge it before replacing it"
            )
        if adapter in self.r:  # replacing: drop the old one first (and undo what its init did)
            self.delete_adapter(adapter)
        self.r[adapter] = r
        self.lora_alpha[adapter] = lora_alpha
        self.scaling[adapter] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_bias[adapter] = bool(lora_bias)
        self._create_adapter(adapter, r)
        if isinstance(init_lora_weights, str) and init_lora_weights != "gaussian":
            self._init_from_weight(adapter, init_lora_weights, loftq_config or {})
        else:
            self._reset_adapter(adapter, init_lora_weights)
        self._to_base_device(adapter)
        if use_dora:
            with torch.no_grad():  # m starts at ||W + dW||, so a fresh DoRA adapter changes nothing
                norm = self._dora_norm(adapter, *self._adapter_params(adapter))
            self.lora_magnitude_vector[adapter] = nn.Parameter(self._magnitude_shape(norm))
            self._dora_cache.pop(adapter, None)

    def delete_adapter(self, adapter: str) -> None:
        """Remove adapter `adapter` and its weights; refuse if it is merged."""
        if adapter in self.merged_adapters:
            raise AdapterStateError(
                f"adapter {adapter!r} is merged into the base weights; unmerge before deleting it"
            )
        if adapter in self._initial:  # PiSSA/OLoRA took B0 A0 out of the base: put it back
            _, a0, b0 = self._initial.pop(adapter)
            self._add_to_base(self._delta(adapter, a0, b0))
        for container in (*self.adapter_containers, "lora_magnitude_vector", "lora_dropout"):
            items = getattr(self, container)
            if adapter in items:
                del items[adapter]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_bias, self._dora_cache):
            d.pop(adapter, None)

    def containers_of(self, adapter: str) -> list[str]:
        """The per-adapter containers that hold `adapter` (DoRA adds `lora_magnitude_vector`)."""
        names = (*self.adapter_containers, "lora_magnitude_vector")
        return [c for c in names if adapter in getattr(self, c)]

    def initial_weights(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A0, B0) of a PiSSA/OLoRA adapter initialised in this session (taken out of the base),
        else None."""
        hit = self._initial.get(adapter)
        return None if hit is None else hit[1:]

    def is_dora(self, adapter: str) -> bool:
        """Whether adapter `adapter` of this layer is a DoRA adapter."""
        return adapter in self.lora_magnitude_vector

    def set_active(self, adapters: list[str]) -> None:
        """Make exactly `adapters` (those this layer carries) active; active, unmerged ones train.

        Called by `lorakit._state.set_active`, the one writer of the active set."""
        self.active_adapters = [a for a in adapters if a in self.r]
        self._update_trainable()

    def _update_trainable(self) -> None:
        for name in self.r:
            train = name in self.active_adapters and name not in self.merged_adapters
            for p in self._adapter_params(name):
                p.requires_grad_(train)

    # mixed-adapter batches -----------------------------------------------------------------

    @property
    def row_adapters(self) -> tuple[str | None, ...] | None:
        """The adapter (or None) of each batch row while `lorakit.mixed.adapter_rows` is active."""
        return None if self._route is None else self._route.rows

    def route_rows(self, route: Routing | None) -> None:
        """Serve every forward's rows (or tokens) as `route` says; `None` goes back to the
        active adapters."""
        self._route = route

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        names = self._batch_adapters(x)
        if names is None and self._route.tokens:  # [1, N, ...] seen as N rows of one token
            if not self.per_token:
                raise ConfigError(
                    f"{type(self).__name__} mixes tokens, so its adapters cannot be chosen per token; "
                    "give each adapter its own batch"
                )
            return self._mixed_forward(token_rows(x), token_rows(result)).reshape(result.shape)
        if names is None:
            return self._mixed_forward(x, result)
        for name in names:
            result = self._add_adapter(name, x, result)
        return result

    def _batch_adapters(self, x: torch.Tensor) -> list[str] | None:
        """The adapters to add to the whole batch, or None when its rows use different ones."""
        route = self._route
        if route is None:
            return self._lora_active()
        check_rows(route, x)
        mine = {n if n in self.r else None for n in route.in_use}
        if len(mine) == 1:  # uniform batch: the plain path
            (name,) = mine
            return [] if name is None else [name]
        return None

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus adapter `name`'s output for input `x` (the family's math)."""
        raise NotImplementedError

    def _init_from_weight(self, adapter: str, init: str, loftq_config: dict) -> None:
        raise ConfigError(
            f"init_lora_weights={init!r} is supported on linear layers only, not on "
            f"{type(self.base_layer).__name__}; exclude this module from target_modules or use True/'gaussian'"
        )

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Row i gets adapter `row_adapters[i]`: each adapter in use runs on its own rows."""
        names = tuple(self.r)
        slots = self._route.slots(names, result.device)[0]
        for s, name in enumerate(names, 1):
            if name in self._route.in_use:
                idx = (slots == s).nonzero().squeeze(1)
                result = result.index_copy(0, idx, self._add_adapter(name, x[idx], result[idx]))
        return result

    def _reset_adapter(self, adapter: str, init: bool | str) -> None:
        """PEFT's init for A/B module pairs: A Kaiming-uniform (or N(0, 1/r)), B zero; False keeps
        the modules' own random init, so a fresh adapter changes the output (useful in tests)."""
        if init is False:
            return
        a = self.lora_A[adapter].weight
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter])
        else:
            kaiming_uniform_(a)
        nn.init.zeros_(self.lora_B[adapter].weight)
        if self.lora_bias[adapter]:
            nn.init.zeros_(self.lora_B[adapter].bias)

    def _adapter_params(self, adapter: str) -> list[nn.Parameter]:
        return [p for c in self.containers_of(adapter) for p in _params_of(getattr(self, c)[adapter])]

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
        """The adapter's contribution in the layout of `base_layer.weight` (already scaled); for a
        DoRA adapter, what its merge adds: `(f - 1) * W + f * dW` for the current base weight W."""
        weights = self._adapter_params(adapter)
        delta = self._delta(adapter, *weights[:2])
        if not self.is_dora(adapter):
            return delta
        f = self._weight_view(weights[2].reshape(-1) / self._dora_norm(adapter, *weights))
        return (f - 1) * self._base_weight().to(delta.dtype) + f * delta

    def _plain_delta(self, adapter: str, weights: list[torch.Tensor]) -> torch.Tensor:
        return self._delta(adapter, *weights[:2])

    def bias_delta(self, adapter: str, weights: list[torch.Tensor]) -> torch.Tensor | None:
        """What a merge adds to the base bias: `scaling * lora_B.bias` (None without `lora_bias`),
        from `weights` in `_adapter_params` order (A, B, B's bias)."""
        return weights[2] * self.scaling[adapter] if self.lora_bias.get(adapter) else None

    def _delta(self, adapter: str, *weights: torch.Tensor) -> torch.Tensor:
        """The scaled delta of adapter `adapter` from its weights (in `_adapter_params` order)."""
        raise NotImplementedError

    def merge(self, adapters: list[str]) -> None:
        """Add each adapter's delta into the base weight (skipping those already merged) and freeze
        the adapter. Raises `AdapterStateError`, changing nothing, if a delta is not finite."""
        todo = [n for n in dict.fromkeys(adapters) if n in self.r and n not in self.merged_adapters]
        weights = {n: [p.detach().clone() for p in self._adapter_params(n)] for n in todo}
        deltas = {n: self._plain_delta(n, weights[n]) for n in todo}
        # every DoRA factor from the weights as the forward sees them now, before any changes
        factors = {
            n: self._weight_view(weights[n][2].reshape(-1) / self._dora_norm(n, *weights[n]))
            for n in todo
            if self.is_dora(n)
        }
        no_bias = [n for n in todo if self.lora_bias.get(n) and self.bias is None]
        if no_bias:  # PEFT refuses this merge too
            raise AdapterStateError(
                f"adapter(s) {no_bias} have lora_bias=True but this {type(self.base_layer).__name__} has no "
                "bias to merge it into; keep them unmerged"
            )
        bad = [
            n
            for n in todo
            if not bool(torch.isfinite(deltas[n]).all())
            or (n in factors and not bool(torch.isfinite(factors[n]).all()))
            or (self.lora_bias.get(n) and not bool(torch.isfinite(weights[n][2]).all()))
        ]
        if bad:
            raise AdapterStateError(
                f"adapter(s) {bad} have a non-finite (NaN/Inf) weight delta; refusing to merge them into "
                "the base weights. Retrain or reload the adapter"
            )
        for name in todo:
            delta = deltas[name]
            if name in factors:  # W <- f * (W + dW)
                f = factors[name]
                delta = (f - 1) * self._base_weight().to(delta.dtype) + f * delta
                self._merged_factors[name] = f
            self._add_to_base(delta, self.bias_delta(name, weights[name]))
            self.merged_adapters.append(name)
            self._merged_weights[name] = weights[name]
        self._update_trainable()

    def unmerge(self, adapters: list[str] | None = None) -> None:
        """Subtract the merged adapters (default: all) from the base weight, last merged first,
        using the weights as they were merged; the adapters become trainable again if active."""
        for name in reversed(list(self.merged_adapters)):
            if adapters is None or name in adapters:
                device = self._adapter_params(name)[0].device  # the model may have moved since
                merged = [w.to(device) for w in self._merged_weights.pop(name)]
                delta = -self._plain_delta(name, merged)
                if name in self._merged_factors:  # W <- W / f - dW
                    f = self._merged_factors.pop(name).to(device)
                    delta = self._base_weight().to(delta.dtype) * (1 / f - 1) + delta
                bias = self.bias_delta(name, merged)
                self._add_to_base(delta, None if bias is None else -bias)
                self.merged_adapters.remove(name)
        self._update_trainable()

    def _add_to_base(self, delta: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Add `delta` to the base weight (and `bias`, a `lora_bias` merge, to its bias)."""
        base = self.base_layer
        with torch.no_grad():
            if bias is not None:
                base.bias.add_(bias.to(base.bias.dtype))
            if hasattr(base, "add_weight_delta_"):  # quantized bases know how to update themselves
                base.add_weight_delta_(delta)
            else:
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
