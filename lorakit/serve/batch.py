"""The rows decoding together in continuous batching: one left-padded KV cache, re-packed as rows
join and leave.

Every row's tokens end at the last column; a row shorter than the batch is padded on the left,
and `mask` (1 for a real token) keeps the padding out of attention. Each row carries its own next
position id, so a row's keys, queries and positions are exactly those it has alone: only the
masked padding differs, which attention ignores. Joining rows (a freshly prefilled group, itself
left-padded) are padded on the left to the common length and concatenated; leaving rows are
dropped, then columns that are padding in every row are cut, so the cache never holds more than
the longest row needs.

Only transformers' plain `DynamicCache` layers (keys and values `[rows, heads, tokens, dim]`) can
be re-packed; `check_cache` refuses others (sliding-window or quantized layers) up front.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from ..errors import ConfigError


def check_cache(cache) -> None:
    """Raise `ConfigError` unless `cache` is made of plain dynamic layers only."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise ConfigError(
            f"continuous batching needs a plain DynamicCache, but this model's cache uses {kinds}; "
            "start the server with --batching static"
        )


class Batch:
    """`cache` (a DynamicCache with `rows` rows), `mask` [rows, tokens] and the next position id
    of each row `positions` [rows]."""

    def __init__(self, cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache, self.mask, self.positions = cache, mask, positions

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def grow(self) -> None:
        """One more column (the token each row is fed next): call after its forward."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], 1)
        self.positions = self.positions + 1

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` (in that order), then cut the columns that are padding in all of them."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        real = self.mask.any(0).nonzero()
        cut = int(real[0]) if len(real) else self.mask.shape[1]
        if cut:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
            self.mask = self.mask[:, cut:]

    def extend(self, other: Batch) -> None:
        """Append `other`'s rows (their caches padded on the left to a common length)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad(mine.keys, width), _pad(theirs.keys, width)])
            mine.values = torch.cat([_pad(mine.values, width), _pad(theirs.values, width)])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])


def _pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(kv, (0, 0, width - kv.shape[2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0))
