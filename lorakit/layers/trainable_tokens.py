"""New-token rows (PEFT's `trainable_token_indices`): train only some rows of an embedding matrix,
such as the tokens added to a tokenizer, and save only those rows.

Each adapter holds the full values of its rows, `token_adapter.trainable_tokens_delta` of shape
[tokens, dim] (PEFT's name and layout: values that replace the rows, not differences added to them,
so a fresh random init of resized rows in the base cannot change what the adapter means). The
forward runs the embedding with those rows written over the base weight; the base stays frozen and
untouched. A weight tied to the embedding (an LM head sharing it) gets a wrapper that reads the same
rows and owns no tensor, so it is saved once, under the embedding (as PEFT does).

`TrainableTokens` is a `ModulesToSave`: a per-adapter replacement of a whole module, so switching,
disabling, mixed-adapter batches, saving under the module's name and unloading work as they do
for `modules_to_save` copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .modules_to_save import ModulesToSave


class TokenRows(nn.Module):
    """One adapter's rows of `base` (an `nn.Embedding`, or a `nn.Linear` whose weight is tied to
    one). `base` is referenced, not registered, so its weight is neither trained nor saved here."""

    def __init__(self, base: nn.Module, indices: list[int], tied: TokenRows | None = None) -> None:
        super().__init__()
        self._base = (base,)  # a tuple: not a submodule (its parameters stay the model's own, frozen)
        self.token_indices = list(indices)
        if tied is None:
            self.token_adapter = (
                nn.Module()
            )  # PEFT's name: ...embed_tokens.token_adapter.trainable_tokens_delta
            rows = base.weight.detach()[torch.tensor(self.token_indices, device=base.weight.device)]
            self.token_adapter.trainable_tokens_delta = nn.Parameter(rows.clone())
        self._tied = (tied,) if tied is not None else ()

    @property
    def delta(self) -> torch.Tensor:
        """The [tokens, dim] row values (the tied embedding's, for a tied head)."""
        return self._tied[0].delta if self._tied else self.token_adapter.trainable_tokens_delta

    def weight(self) -> torch.Tensor:
        """The base weight with the rows written in (a new tensor; the base is untouched)."""
        w = self._base[0].weight
        index = torch.tensor(self.token_indices, device=w.device)
        return w.index_copy(0, index, self.delta.to(w.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._base[0]
        if isinstance(base, nn.Embedding):
            out = F.embedding(
                x,
                self.weight(),
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in their forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        return F.linear(x, self.weight(), base.bias)


class TrainableTokens(ModulesToSave):
    """Wraps an `nn.Embedding` (or a tied `nn.Linear` head); `modules_to_save[adapter]` is that
    adapter's `TokenRows`."""

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, as model code that reads `embed_tokens.weight` expects (without the rows)."""
        return self.original_module.weight

    def add_rows(self, adapter: str, indices: list[int], tied: TokenRows | None = None) -> TokenRows:
        """Give `adapter` trainable `indices` rows, started from the base's values (or read `tied`'s
        rows). Raises `ConfigError` for an index outside the matrix or a layer of another type."""
        base = self.original_module
        if not isinstance(base, (nn.Embedding, nn.Linear)):
            raise ConfigError(
                f"trainable_token_indices: {type(base).__name__} is not an embedding; name an nn.Embedding"
            )
        rows = base.weight.shape[0]
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < rows]
        if bad or not indices or len(set(indices)) < len(indices):
            raise ConfigError(
                f"trainable_token_indices: {bad or indices} must be distinct row indices below {rows} (the "
                "vocabulary size); resize the embeddings (model.resize_token_embeddings) before adding new tokens"
            )
        self.modules_to_save[adapter] = TokenRows(base, indices, tied)
        return self.modules_to_save[adapter]

    def add_adapter(self, adapter: str) -> None:
        raise ConfigError("a TrainableTokens wrapper takes rows (add_rows), not a module copy")

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module `unload` puts back: the original, with the active adapter's rows written
        into its weight when `merge`."""
        rows = self.current()
        if merge and isinstance(rows, TokenRows):
            with torch.no_grad():
                index = torch.tensor(rows.token_indices, device=self.original_module.weight.device)
                self.original_module.weight.index_copy_(
                    0, index, rows.delta.to(self.original_module.weight.dtype)
                )
        return self.original_module
