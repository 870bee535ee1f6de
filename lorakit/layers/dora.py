"""DoRA (weight-decomposed LoRA) math, as pure functions on tensors.

DoRA writes the adapted weight as a magnitude times a direction: `W' = m * (W + dW) / ||W + dW||`,
the norm taken per output feature (per row of the weight as an `[features, fan_in]` matrix; for an
embedding per embedding dimension, over the vocabulary), `dW = scaling * B @ A` and `m` a trained
vector initialised to `||W||` (of `W + dW` at init, as in PEFT). As in PEFT (and the paper's
section 4.3), the norm is treated as a constant: it gets no gradient.

The forward never builds `W + dW`: the squared norm of each row expands to

    ||W_i||^2 + 2 s <W_i, (B A)_i> + s^2 ||(B A)_i||^2
      = w_sq_i + 2 s sum_k B_ik (W A^T)_ik + s^2 sum_k (B (A A^T))_ik B_ik

which needs `W A^T` (`[features, r]`) and `A A^T` (`[r, r]`) only; `||W_i||^2` is constant while the
base weight is frozen, so the layers cache it. PEFT instead builds `B @ A` (through an identity
matrix) and `W + s B A`, two full-size matrices per forward.

The layer output, with `f = m / ||W + dW||` broadcast over the output features:

    y = (result - base) + f * (base + s * B A x)

where `base` is the base layer's output without its bias (`result - bias`, or, when training with
dropout, the base applied to the dropped input, as PEFT computes it).
"""

from __future__ import annotations

import torch
from torch import nn


def weight_norm(
    w_sq: torch.Tensor, w_a: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`||W_i + scaling * (B A)_i||` per row i, from `w_sq = ||W_i||^2` `[n]`, `w_a = W @ A.T`
    `[n, r]`, `A` `[r, fan_in]` and `B` `[n, r]` (see the module docstring); no full-size matrix."""
    gram = lora_a @ lora_a.T
    cross = (lora_b * w_a).sum(1)
    own = ((lora_b @ gram) * lora_b).sum(1)
    return (w_sq + (2 * scaling) * cross + (scaling * scaling) * own).clamp_min(0).sqrt()


def weight_norm_dense(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The reference: `||W_i + delta_i||` per row of the 2-D `weight + delta` (PEFT's formula)."""
    return torch.linalg.norm(weight + delta, dim=1)


def _version_key(t: torch.Tensor) -> tuple[int, int, int]:
    """Changes whenever `t` is replaced or changed in place (optimizer steps, copy_, merges)."""
    return id(t), t._version, t.data_ptr()


class DoraParts:
    """The DoRA half of `LoraLayer` (mixed in): the forward, the factor and the cached norm, and the
    layout hooks each family overrides. State (`lora_magnitude_vector`, `_dora_cache`) is created
    by `LoraLayer.__init__`."""

    def _add_dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The DoRA output for adapter `name`: `(result - base) + f * (base + s B A x)` (module
        docstring), with PEFT's semantics for `base`."""
        m = self.lora_magnitude_vector[name]
        factor = self._feature_view(self._dora_factor(name), result)
        drop = self.lora_dropout[name]
        if self.training and self._drops_input and not isinstance(drop, nn.Identity):
            x = drop(x)
            base = self.base_layer(x)
            if self.bias is not None:
                base = base - self._feature_view(self.bias, base)
            rest = result - base
        elif self.bias is not None:
            rest = self._feature_view(self.bias, result)
            base = result - rest
        else:
            base, rest = result, None
        inner = self._base_plus_lora(name, x, base.to(m.dtype))
        out = factor * inner
        return (out if rest is None else out + rest.to(m.dtype)).to(result.dtype)

    def _base_plus_lora(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """`base + scaling * B(A(x))` (linear layers fuse it into one kernel)."""
        return base + self._lora_output(name, x)

    def _dora_factor(self, name: str) -> torch.Tensor:
        """`m / ||W + dW||` per output feature (the norm a constant), flat `[features]`."""
        return self.lora_magnitude_vector[name].reshape(-1) / self._dora_norm(name)

    def _dora_norm(self, name: str, *weights: torch.Tensor) -> torch.Tensor:
        """`||W + dW||` per feature, without gradient, from the live weights (cached until they or
        the base weight change) or from the given `weights` (in `_adapter_params` order)."""
        live = not weights
        if live:
            weights = tuple(self._adapter_params(name))
        base_key = _version_key(self.base_layer.weight)
        key = (*(_version_key(w) for w in weights[:2]), base_key, self.scaling[name])
        hit = self._dora_cache.get(name)
        if live and hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            a2, b2 = self._ab_2d(weights[0].detach(), weights[1].detach())
            w = self._weight_2d().to(a2.dtype)
            if self._dora_cache.get("", (None,))[0] != base_key:  # ||W_i||^2: constant while W is
                self._dora_cache[""] = (base_key, (w * w).sum(1))
            norm = weight_norm(self._dora_cache[""][1], w @ a2.T, a2, b2, self.scaling[name])
        if live:
            self._dora_cache[name] = (key, norm)
        return norm

    def _base_weight(self) -> torch.Tensor:
        """The base weight as stored (dequantized in fp32 for a 4-bit base)."""
        base = self.base_layer
        return base.dequantize(torch.float32) if hasattr(base, "dequantize") else base.weight

    def _weight_2d(self) -> torch.Tensor:
        """The base weight as `[features, fan_in]` (DoRA's norm is per row of it)."""
        raise NotImplementedError

    def _ab_2d(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A as `[r, fan_in]` and B as `[features, r]`, matching `_weight_2d`."""
        return lora_a, lora_b

    def _feature_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-feature vector shaped to broadcast over a layer output like `like` (features last)."""
        return v

    def _weight_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-feature vector shaped to broadcast over the base weight (`[out, in]`: a column)."""
        return v.view(-1, 1)

    def _magnitude_shape(self, norm: torch.Tensor) -> torch.Tensor:
        """The magnitude vector in PEFT's saved shape (`[features]`; conv layers differ)."""
        return norm

    def _lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`scaling * B(A(x))` for an already dropped-out input, in the adapter dtype."""
        raise NotImplementedError
