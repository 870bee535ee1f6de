"""The server's adapters: which names exist (given at start or found in the allowed folder) and
which are loaded on the model now, with a size limit and least-recently-used eviction.

Run-time loading goes by name only: the folder is `adapter_dir/name`, and a name that could step
outside that folder (`..`, `/`, a leading dot) is refused, as is a symlink that resolves outside it.
Not thread-safe on its own: the engine calls it while holding its model lock.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..adapters import delete_adapter
from ..config import CONFIG_NAME
from ..errors import AdapterFileError, AdapterStateError, ConfigError
from ..io import adapter_folder, load_adapter

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def check_name(name: str) -> str:
    """`name` if it is a safe adapter name, else `ConfigError` (letters, digits, `_.-`, no `..`)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid adapter name {name!r}: use 1-128 letters, digits, '_', '.', '-' (no '/', no '..')"
        )
    return name


class AdapterCache:
    """Known adapters (name -> folder) and an LRU set of at most `capacity` loaded on `model`."""

    def __init__(
        self,
        model: nn.Module,
        adapters: dict[str, str | Path] | None = None,
        adapter_dir: str | Path | None = None,
        capacity: int = 8,
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"the adapter cache needs room for at least one adapter, got {capacity}")
        self.model = model
        self.capacity = capacity
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        if self.adapter_dir and not self.adapter_dir.is_dir():
            raise ConfigError(f"--adapter-dir {adapter_dir}: no such folder")
        self.known: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()
        for name, folder in (adapters or {}).items():
            folder = adapter_folder(folder, name)  # the folder itself, or PEFT's folder/<name>
            if not (folder / CONFIG_NAME).is_file():
                raise AdapterFileError(f"adapter {name!r}: {folder} has no {CONFIG_NAME}")
            self.known[check_name(name)] = folder
        if self.adapter_dir:
            for sub in sorted(self.adapter_dir.iterdir()):
                if (
                    (sub / CONFIG_NAME).is_file()
                    and NAME_RE.fullmatch(sub.name)
                    and sub.name not in self.known
                ):
                    self.known[sub.name] = sub

    def names(self) -> list[str]:
        return list(self.known)

    def register(self, name: str) -> Path:
        """Make `adapter_dir/name` known. Raises `ConfigError` (bad name, no adapter dir) or
        `AdapterFileError` (no such adapter folder)."""
        check_name(name)
        if self.adapter_dir is None:
            raise ConfigError(
                "this server was started without --adapter-dir, so it cannot load adapters by name"
            )
        folder = (self.adapter_dir / name).resolve()
        if folder.parent != self.adapter_dir or not (folder / CONFIG_NAME).is_file():
            raise AdapterFileError(f"no adapter named {name!r} in the adapter folder")
        self.known[name] = folder
        return folder

    def unregister(self, name: str) -> None:
        """Forget `name`, unloading it first. Raises `AdapterStateError` if unknown."""
        if name not in self.known:
            raise AdapterStateError(f"no adapter named {name!r}")
        self.unload(name)
        del self.known[name]

    def unload(self, name: str) -> None:
        if name in self.loaded:
            del self.loaded[name]
            delete_adapter(self.model, name)
            log.info("unloaded adapter %s", name)

    def ensure(self, names: list[str]) -> None:
        """Load `names` (at most `capacity`), evicting the least recently used others."""
        if len(names) > self.capacity:
            raise AdapterStateError(
                f"{len(names)} adapters needed at once but the cache holds {self.capacity}"
            )
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            if name not in self.known:
                raise AdapterStateError(f"no adapter named {name!r}")
            while len(self.loaded) >= self.capacity:
                victim = next(n for n in self.loaded if n not in names)
                self.unload(victim)
            load_adapter(self.model, self.known[name], name, activate=False)
            self.loaded[name] = None
            log.info("loaded adapter %s from %s", name, self.known[name])
