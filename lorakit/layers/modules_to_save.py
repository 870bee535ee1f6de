"""Full trainable copies of whole modules (`modules_to_save`), one per adapter, as PEFT keeps them.

A classifier's new head, for example, is not low-rank: it is trained in full. The wrapper keeps the
original module untouched and a copy per adapter; the forward runs the active adapter's copy.
In a mixed-adapter batch (`route_rows`) one module cannot differ per row, so only a batch whose
rows all use one adapter (or none) can run through it.
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import ConfigError

_UNROUTED = object()


class ModulesToSave(nn.Module):
    """Holds `original_module` and `modules_to_save[adapter]` copies (PEFT's names and layout)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self._routed: object = _UNROUTED  # the copy a routed batch uses (None: the original)

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

    def route_rows(self, rows: list[str | None] | None) -> None:
        """Serve a batch whose row `i` uses adapter `rows[i]` (None: back to the active adapter).

        Raises `ConfigError` when rows use different copies: a whole module cannot differ per row."""
        if rows is None:
            self._routed = _UNROUTED
            return
        mine = {n if n in self.modules_to_save else None for n in rows}
        if len(mine) > 1:
            raise ConfigError(
                f"has modules_to_save copies for {sorted(n for n in mine if n)}; a whole module cannot "
                "differ per row, so these adapters cannot be mixed in one batch"
            )
        self._routed = next(iter(mine), None)

    def current(self) -> nn.Module:
        """The module the forward runs now."""
        name = self.active_adapter if self._routed is _UNROUTED else self._routed
        if self.disabled or name is None:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
