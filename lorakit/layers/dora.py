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


def dora_output(
    result: torch.Tensor, base: torch.Tensor, lora: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """`(result - base) + factor * (base + lora)`: the DoRA layer output from the base layer's
    `result`, its bias-free part `base`, the scaled LoRA output and `factor = m / norm`."""
    return (result - base) + factor * (base + lora)
