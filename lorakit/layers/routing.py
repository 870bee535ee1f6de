"""Mixed-adapter batches' routing: which adapter each batch row (or packed token) uses, as
`lorakit.mixed.adapter_rows` hands it to every wrapper (`LoraLayer.route_rows`), and the shape
checks and views the wrappers share."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ShapeMismatchError


class Routing:
    """Which adapter each batch row uses (None: none), or with `tokens` each token of one packed
    sequence `[1, N, ...]`: what `lorakit.mixed.adapter_rows` hands every wrapper. Read only.

    What the wrappers derive from it is worked out once per routing, not once per layer and
    forward: the adapters in use (`in_use`) and, for each list of adapters (most layers hold the
    same ones), each row's slot and the runs of rows on one slot (`slots`). Measured on
    SmolLM2-135M with 8 adapters (210 layers), a packed step of 8 decode tokens on 8 adapters
    and a 16-token prompt chunk went from 1.37-1.39x to 1.25-1.27x the same step on one
    adapter (benchmarks/README.md, "Routing once per step").
    """

    def __init__(self, rows: Sequence[str | None], tokens: bool = False) -> None:
        self.rows = tuple(rows)
        self.tokens = tokens
        self.in_use = tuple(dict.fromkeys(self.rows))  # each name once, in order of first use
        self._slots: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def slots(
        self, names: tuple[str, ...], device: torch.device
    ) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """Each row's slot among `names` (`names[i]` is slot i + 1; 0: none of them) as a tensor
        on `device`, and the runs of consecutive rows on one nonzero slot, (first, end, slot)."""
        key = (names, device)
        hit = self._slots.get(key)
        if hit is None:
            slot = {n: i for i, n in enumerate(names, 1)}
            per_row = [slot.get(n, 0) for n in self.rows]
            hit = self._slots[key] = (torch.tensor(per_row, device=device), _runs(per_row))
        return hit


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first row, end row, slot) of each run of consecutive rows on one nonzero slot."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][2] == s and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1, s)
        elif s:
            runs.append((i, i + 1, s))
    return runs


def check_rows(route: Routing, x: torch.Tensor) -> None:
    """Raise `ShapeMismatchError` unless batch `x` has one row per entry of `route` (routed per
    token: unless `x` is one sequence of one token per entry)."""
    n = len(route)
    if route.tokens and (x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != n):
        raise ShapeMismatchError(
            f"adapter_rows names {n} tokens but a layer got an input of shape {tuple(x.shape)}; "
            "routing per token takes one sequence [1, tokens, ...] with one name per token"
        )
    if not route.tokens and x.shape[0] != n:
        raise ShapeMismatchError(
            f"adapter_rows names {n} rows but a layer got a batch of {x.shape[0]}; "
            "give one adapter name (or None) per batch row"
        )


def token_rows(t: torch.Tensor) -> torch.Tensor:
    """One packed sequence `[1, N, ...]` viewed as N rows of one token `[N, 1, ...]`."""
    return t.reshape(t.shape[1], 1, *t.shape[2:])
