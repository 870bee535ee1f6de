"""Full trainable copies of whole modules (`modules_to_save`), one per adapter, as PEFT keeps them.

A classifier's new head, for example, is not low-rank: it is trained in full. The wrapper keeps the
original module untouched and a copy per adapter; the forward runs the active adapter's copy.
In a mixed-adapter batch (`route_rows`) each copy in use runs on its own rows (PEFT does the same),
so the module's first argument must be the batch and its output a tensor with the batch first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from .routing import Routing, check_rows, token_rows


class ModulesToSave(nn.Module):
    """Holds `original_module` and `modules_to_save[adapter]` copies (PEFT's names and layout)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self._route: Routing | None = None  # mixed-adapter batches: each row's adapter

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, adapter: str) -> None:
        """Give `adapter` its own trainable copy of the original module."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter] = clone

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.modules_to_save:
            del self.modules_to_save[adapter]

    def set_active(self, adapters: list[str]) -> None:
        mine = [a for a in adapters if a in self.modules_to_save]
        # a module can only be replaced by one copy at a time: the first active adapter that has one
        self.active_adapter = mine[0] if mine else None
        for name, module in self.modules_to_save.items():
            for p in module.parameters():
                p.requires_grad_(name == self.active_adapter)

    def route_rows(self, route: Routing | None) -> None:
        """Serve each batch row (or token, only for modules that act on each token alone,
        `per_token`) with its adapter's copy as `route` says (the original where the adapter has
        none); `None` goes back to the active adapter."""
        self._route = route

    def _copies_in_use(self) -> set[str | None]:
        """The copies the routed rows use (None: the original)."""
        return {n if n in self.modules_to_save else None for n in self._route.in_use}

    def current(self) -> nn.Module:
        """The module the forward runs now (for a routed batch, that of its first row)."""
        name = self.active_adapter
        if self._route is not None:
            name = next(iter(self._route.rows), None)
        if self.disabled or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module `unload` puts back: the active adapter's copy when `merge`, else the
        original."""
        return self.current() if merge else self.original_module

    @property
    def per_token(self) -> bool:
        """Whether the module acts on each token alone (a linear layer, an embedding, a norm over
        the last dimension), so its copies can be chosen per token."""
        m = self.original_module
        return isinstance(m, nn.Linear | nn.Embedding | nn.LayerNorm | nn.RMSNorm) or type(
            m
        ).__name__.endswith(("RMSNorm", "LayerNorm"))

    def forward(self, *args, **kwargs):
        route = self._route
        in_use = None if route is None else self._copies_in_use()
        if in_use is None or self.disabled or len(in_use) <= 1:
            return self.current()(*args, **kwargs)
        x, rest = args[0], args[1:]
        check_rows(route, x)
        if not route.tokens:
            return self._rows_forward(x, in_use, rest, kwargs)
        if not self.per_token:
            raise ConfigError(
                f"modules_to_save copies of a {type(self.original_module).__name__} cannot be chosen per "
                "token (it may mix tokens); give each adapter its own batch"
            )
        out = self._rows_forward(token_rows(x), in_use, rest, kwargs)
        return out.reshape(1, *out.shape[:1], *out.shape[2:])

    def _rows_forward(
        self, x: torch.Tensor, in_use: set[str | None], rest: tuple, kwargs: dict
    ) -> torch.Tensor:
        """Each copy in use (`in_use`, None: the original) on its own rows of `x`."""
        names = tuple(self.modules_to_save)
        slots = self._route.slots(names, x.device)[0]
        out = None
        for s, name in enumerate((None, *names)):
            if name not in in_use:
                continue
            idx = (slots == s).nonzero().squeeze(1)
            module = self.original_module if name is None else self.modules_to_save[name]
            y = module(x[idx], *rest, **kwargs)
            if not isinstance(y, torch.Tensor):
                raise ConfigError(
                    f"modules_to_save: a {type(module).__name__} returns {type(y).__name__}, so its copies "
                    "cannot serve a mixed-adapter batch; give each adapter its own batch"
                )
            out = y.new_zeros((len(slots), *y.shape[1:])) if out is None else out
            out = out.index_copy(0, idx, y)
        return out
