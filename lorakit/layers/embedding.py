"""LoRA for `nn.Embedding`, in PEFT's layout.

    y = embed(ids) + scaling * (A.T[ids] @ B.T)      A: [r, num_embeddings], B: [dim, r]

As in loralib and PEFT, A starts at zero and B random, so a fresh adapter changes nothing.

DoRA: as in PEFT, the norm is per embedding dimension (over the vocabulary, i.e. per row of the
table's transpose `[dim, num_embeddings]`), and the factor scales the whole output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


def embedding_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`scaling * (B @ A).T`, shaped like the embedding table `[num_embeddings, dim]`."""
    return (lora_b @ lora_a).T * scaling


class LoraEmbedding(LoraLayer):
    """Wraps an `nn.Embedding`; see the module docstring for the math."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")
    supports_dora = True
    _drops_input = False  # dropout does not apply to token ids (PEFT ignores it here as well)

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_adapter(self, adapter: str, r: int) -> None:
        dtype = self._adapter_dtype()
        n, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter] = nn.Parameter(torch.randn(r, n, dtype=dtype))
        self.lora_embedding_B[adapter] = nn.Parameter(torch.randn(dim, r, dtype=dtype))

    def _reset_adapter(self, adapter: str, init: bool | str) -> None:
        if init is False:
            return
        nn.init.zeros_(self.lora_embedding_A[adapter])
        nn.init.normal_(self.lora_embedding_B[adapter])

    def _delta(self, adapter: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        return embedding_delta(lora_a, lora_b, self.scaling[adapter])

    def _weight_2d(self) -> torch.Tensor:
        return self._base_weight().T

    def _weight_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1)

    def _lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        a = self.lora_embedding_A[name]
        after_a = F.embedding(
            x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]

    def _add_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.is_dora(name):
            return self._add_dora(name, x, result)
        return result + self._lora_output(name, x).to(result.dtype)
