"""LoRA for linear layers: `nn.Linear`, GPT-2's `Conv1D` (weight stored transposed), and any layer
with `in_features`/`out_features` whose forward is `x @ W.T (+ b)` (the 4-bit linear too).

    y = base(x) + scaling * B(A(dropout(x)))      A: [r, in], B: [out, r]

DoRA (`lorakit.layers.dora`): the norm is per output feature, over the `[out, in]` weight (GPT-2's
`Conv1D` and the 4-bit base included); mixed batches scale each DoRA row by its adapter's factor.
PiSSA, OLoRA and LoftQ (`lorakit.init`) initialise A and B from the base weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import init as inits
from ..modeling import is_conv1d
from .base import LoraLayer
from .routing import Routing


def linear_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """`scaling * B @ A` in the base weight's layout (`[in, out]` when `fan_in_fan_out`)."""
    delta = (lora_b @ lora_a) * scaling
    return delta.T if fan_in_fan_out else delta


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for the device (a device without autocast, such as meta: no)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class LoraLinear(LoraLayer):
    """Wraps a linear base layer; see the module docstring for the math."""

    adapter_containers = ("lora_A", "lora_B")
    max_runs = 8  # mixed batches at inference: up to this many runs of rows take their own matmuls
    supports_dora = True
    supports_lora_bias = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)  # transformers' GPT-2 layer: weight [in, out]
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._stacks: tuple | None = None  # mixed batches at inference: every adapter, stacked
        self._routed: tuple | None = None  # ... and the routed rows' slots in those stacks

    def _create_adapter(self, adapter: str, r: int) -> None:
        dtype = self._adapter_dtype()
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, dtype=dtype)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=self.lora_bias[adapter], dtype=dtype)

    def _delta(self, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        return linear_delta(lora_a, lora_b, self.scaling[adapter], self.fan_in_fan_out)

    def _weight_2d(self) -> torch.Tensor:
        w = self._base_weight()
        return w.T if self.fan_in_fan_out else w

    def _weight_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1) if self.fan_in_fan_out else v.view(-1, 1)

    def _lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name]
        return F.linear(F.linear(x.to(a.dtype), a), b.weight, b.bias) * self.scaling[name]

    def _base_plus_lora(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[name].weight
        h = F.linear(x.to(a.dtype), a)
        out = torch.addmm(
            base.reshape(-1, self.out_features),
            h.reshape(-1, h.shape[-1]),
            self.lora_B[name].weight.T,
            alpha=self.scaling[name],
        )
        return out.view(base.shape)

    def _init_from_weight(self, adapter: str, init: str, loftq_config: dict) -> None:
        """PiSSA / OLoRA (the residual replaces the base weight) or LoftQ (the base becomes the
        NF4 `Linear4bit` of LoftQ's last quantization); see `lorakit.init`."""
        a, b, base = inits.weight_init(
            self.base_layer, init, self.r[adapter], self.scaling[adapter], self.fan_in_fan_out, loftq_config
        )
        with torch.no_grad():
            self.lora_A[adapter].weight.copy_(a)
            self.lora_B[adapter].weight.copy_(b)
        if base is not None:  # LoftQ: the quantized base
            self.base_layer = base
        else:  # PiSSA / OLoRA: keep A0, B0 (the conversion at save) and take them out of the base
            self._initial[adapter] = (init, a.clone(), b.clone())
            self._add_to_base(-self._delta(adapter, a, b))

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.is_dora(name):
            return self._add_dora(name, x, result)
        a = self.lora_A[name].weight
        b = self.lora_B[name].weight
        h = F.linear(self.lora_dropout[name](x.to(a.dtype)), a)
        base = result.reshape(-1, self.out_features).to(a.dtype)
        if self.lora_bias[name]:  # lora_bias: scaling * (h @ B.T + b)
            base = base + self.lora_B[name].bias * self.scaling[name]
        # one fused kernel for result + scaling * (h @ B.T): cheaper than matmul, scale, add; at
        # inference into the base output itself (no fresh output-sized tensor, the same bits).
        # Not under autograd: the in-place write into the reshaped view makes the backward copy
        # the gradient (CopySlices), and selective checkpointing refuses a mutated matmul output.
        # Not under autocast: only the out-of-place op casts its operands (h is bf16, B is not)
        in_place = not torch.is_grad_enabled() and not _autocast(base.device.type)
        add = torch.Tensor.addmm_ if in_place else torch.addmm
        out = add(base, h.reshape(-1, h.shape[-1]), b.T, alpha=self.scaling[name])
        return out.view(result.shape).to(result.dtype)

    def route_rows(self, route: Routing | None) -> None:
        super().route_rows(route)
        self._routed = None  # each row's slot follows the rows; the stacks do not

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self._stacks = self._routed = None  # free the stacked copy of its weights now

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Mixed batch: row i gets adapter `row_adapters[i]` (nothing if None or not on this layer).

        BGMV-style: the adapters are stacked (ranks zero-padded to the largest), each row gathers
        its own A and B by slot index, and two batched matmuls serve the whole batch. A decode
        step (one token per row) with no more slots than twice the rows instead multiplies by all
        stacked adapters at once and masks out the other rows' slots: the same result, without
        copying per-row weights, which at one token per row costs more than the extra
        multiply-adds. At inference the stack holds every adapter of the layer (S-LoRA style), so
        rows joining or leaving only re-index it (`_stacked`).

        At inference a batch of at most `max_runs` runs of consecutive rows on one adapter (a
        server's usual batch) instead gives each run its own two matmuls on slices of the stacks:
        no gather, no multiply-adds for other rows' adapters. Measured on SmolLM2-135M with 8
        adapters, one decode step with each row on its own adapter cost 1.30 / 1.31 / 1.25x a
        step with all rows on one adapter for 2 / 4 / 8 rows, against 1.63 / 1.72 / 1.40x through
        the stacked paths (benchmarks/README.md, serving).
        """
        route = self._route
        used = [n for n in route.in_use if n in self.r]
        # this runs at every forward of every wrapped layer: plain dict lookups, not nn.Module's
        # attribute access (about 1 us each)
        dropout, dora = self.lora_dropout._modules, self.lora_magnitude_vector
        dropped_dora = self.training and any(n in dora and type(dropout[n]) is not nn.Identity for n in used)
        biased = any(self.lora_bias[n] for n in used)
        if biased or dropped_dora:  # DoRA's base part then needs each row's dropout
            return super()._mixed_forward(x, result)  # (lora_bias: the per-adapter path adds each bias)
        (a_stack, b_cat, p, factor), (idx, mask, runs) = self._stacked(used)
        h = x.reshape(len(route), -1, self.in_features).to(a_stack.dtype)
        if self.training and bool((p > 0).any()):
            keep = (torch.rand_like(h) >= p[idx, None, None]).to(h.dtype)
            h = h * keep / (1 - p[idx, None, None])
        if runs is not None:  # inference, few runs of rows: their own matmuls (weights per run)
            out = result.reshape(len(route), -1, self.out_features).to(a_stack.dtype, copy=True)
            flat_h, flat_out, t = h.reshape(-1, self.in_features), out.view(-1, self.out_features), h.shape[1]
            for first, end, a, b_t in runs:  # (F.linear is bf16 under autocast; addmm_ is not cast)
                part = F.linear(flat_h[first * t : end * t], a).to(flat_out.dtype)
                flat_out[first * t : end * t].addmm_(part, b_t)
        elif h.shape[1] == 1 and mask is not None:  # decode step: dense over the adapters' slots
            r = a_stack.shape[1]  # (not slot 0, the zeros of rows with no adapter), masked per row
            h = F.linear(h[:, 0], a_stack[1:].reshape(-1, self.in_features)) * mask
            out = torch.addmm(
                result.reshape(len(route), self.out_features).to(a_stack.dtype), h, b_cat[:, r:].T
            )
        else:
            b_stack = b_cat.view(self.out_features, len(a_stack), -1).permute(1, 2, 0)  # [k+1, r, out]
            h = torch.bmm(h, a_stack[idx].transpose(1, 2))
            out = torch.baddbmm(
                result.reshape(len(route), -1, self.out_features).to(a_stack.dtype), h, b_stack[idx]
            )
        if factor is not None:  # DoRA rows: f * (result - bias + lora) + bias (f = 1 for the others)
            f = factor[idx].view(len(route), *[1] * (out.dim() - 2), -1)
            bias = None if self.bias is None else self.bias.to(out.dtype)
            out = out * f if bias is None else (out - bias) * f + bias
        return out.view(result.shape).to(result.dtype)

    def _stacked(self, used: list[str]) -> tuple[tuple, tuple]:
        """The stacks (`_build_stacks`) and the rows' slots (`_slot_rows`). Training builds them
        from the adapters in use at every forward (autograd needs the live weights); inference
        uses `inference_stacks`, and the slots follow the routing (`route_rows`)."""
        if torch.is_grad_enabled():
            return self._build_stacks(used), self._slot_rows(used)
        stacks = self.inference_stacks()
        if self._routed is None:  # cleared by route_rows and by a rebuild of the stacks
            idx, mask, runs = self._slot_rows(list(self.r))
            if runs is not None:  # each run's A and B.T (sliced when the stacks were built)
                per_slot = self._stacks[4]
                runs = [(f, e, *per_slot[s]) for f, e, s in runs]
            self._routed = stacks, (idx, mask, runs)
        return self._routed

    @torch.no_grad()
    def inference_stacks(self) -> tuple | None:
        """The stacks of every adapter of the layer that inference keeps (None without adapters),
        built when missing or stale: until an adapter is added or deleted, or any stacked tensor
        (A, B, DoRA magnitude, base weight for DoRA) is replaced or changed in place (optimizer
        steps, `copy_`, merges bump the tensor's version). The server calls it when its adapters
        change, so the first mixed batch after a load does not pay for the build."""
        names = list(self.r)
        if not names:
            return None
        meta, tensors = self._stack_key(names)
        versions = tuple(t._version for t in tensors)
        hit = self._stacks
        if not (
            hit is not None
            and hit[0] == meta
            and hit[2] == versions
            and all(a is b for a, b in zip(hit[1], tensors, strict=True))
        ):  # the entry holds its tensors, so a freed one's id or memory cannot come back as a match
            stacks = self._build_stacks(names)
            a_stack, b_cat, r = stacks[0], stacks[1], stacks[0].shape[1]
            per_slot = [(a_stack[s], b_cat[:, s * r : (s + 1) * r].T) for s in range(len(a_stack))]
            self._stacks = hit = (meta, tensors, versions, stacks, per_slot)  # per slot: A and B.T
            self._routed = None
        return hit[3]

    def _stack_key(self, names: list[str]) -> tuple[tuple, list[torch.Tensor]]:
        """What the stacks are built from: (names, scalings, dropouts) and the tensors."""
        # checked at every forward: plain dict lookups (see `_mixed_forward`)
        a, b, dropout = self.lora_A._modules, self.lora_B._modules, self.lora_dropout._modules
        meta = tuple((n, self.scaling[n], dropout[n].__dict__.get("p", 0.0)) for n in names)
        tensors = []
        dora = self.lora_magnitude_vector
        for n in names:
            tensors += (a[n]._parameters["weight"], b[n]._parameters["weight"])
            if n in dora:
                tensors.append(dora[n])
        if len(dora):
            tensors.append(self.base_layer.weight)
        return meta, tensors

    def _build_stacks(self, names: list[str]) -> tuple[torch.Tensor | None, ...]:
        """Stacked A [k+1, r, in], the scaled Bs side by side [out, (k+1)*r] (one copy serves both
        the decode step's dense matmul and, viewed per slot, the per-row gather), dropout p (slot 0
        is "none"; ranks zero-padded to the largest) and the DoRA factors [k+1, out] (ones for
        plain slots; None when none of `names` is DoRA). `stack_nbytes` counts what this holds."""
        a0 = self.lora_A[names[0]].weight
        r = max(self.r[n] for n in names)
        a_stack = torch.stack(
            [a0.new_zeros(r, self.in_features)]
            + [F.pad(self.lora_A[n].weight, (0, 0, 0, r - self.r[n])) for n in names]
        )
        b_cat = torch.cat(
            [a0.new_zeros(self.out_features, r)]
            + [F.pad(self.lora_B[n].weight, (0, r - self.r[n])) * self.scaling[n] for n in names],
            dim=1,
        )
        p = torch.tensor([0.0] + [getattr(self.lora_dropout[n], "p", 0.0) for n in names], device=a0.device)
        factor = None
        if any(self.is_dora(n) for n in names):
            one = a0.new_ones(self.out_features)
            factor = torch.stack([one] + [self._dora_factor(n) if self.is_dora(n) else one for n in names])
        return a_stack, b_cat, p.to(a0.dtype), factor

    def stack_nbytes(self, names: list[str] | None = None) -> int:
        """Bytes of the stacks mixed-adapter batches build of `names` (default: every adapter of
        the layer, what inference keeps): a copy of each adapter's A and scaled B, ranks padded to
        the largest, one zero slot, and the DoRA factors. Built or not: what a memory limit must
        count."""
        names = list(self.r) if names is None else [n for n in names if n in self.r]
        if not names:
            return 0
        size = self.lora_A[names[0]].weight.element_size()
        slots, r = len(names) + 1, max(self.r[n] for n in names)
        dora = any(self.is_dora(n) for n in names)
        return size * slots * (r * (self.in_features + self.out_features) + 1 + dora * self.out_features)

    def _slot_rows(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list | None]:
        """Each row's slot in the stack of `names` (0: no adapter); at inference the runs of
        consecutive rows on one slot, (first, end, slot), when there are at most `max_runs` of
        them or they average 16 rows (a packed sequence's prompt chunks; None otherwise); without
        runs, when a dense decode step is worth it (at most twice as many slots as rows), each
        row's mask over the ranks of slots 1..k."""
        route = self._route
        idx, runs = route.slots(tuple(names), self.lora_A[names[0]].weight.device)
        if torch.is_grad_enabled() or len(runs) > max(self.max_runs, len(route) // 16):
            runs = None
        if runs is not None or len(names) + 1 > 2 * len(route):
            return idx, None, runs
        r = max(self.r[n] for n in names)
        one_hot = F.one_hot(idx, len(names) + 1)[:, 1:]  # slot 0 is left out of the dense step
        mask = one_hot.to(self.lora_A[names[0]].weight.dtype).repeat_interleave(r, 1)
        return idx, mask, runs
