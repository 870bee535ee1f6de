"""The server's adapters: which names exist (given at start or found in the allowed folder) and
which are loaded on the model now, with a size limit and least-recently-used eviction.

Run-time loading goes by name only: the folder is `adapter_dir/name`, and a name that could step
outside that folder (`..`, `/`, a leading dot) is refused, as is a folder or file in it that
resolves outside (a symlink): checked when the folder is found and again when it is loaded.

A served name is public (any `NAME_RE` name, dots included, e.g. `llama-3.1-math`); on the model
the adapter is loaded under a key made of letters, digits and `_` only, because adapter names
are module keys, which cannot hold a '.'.

Not thread-safe on its own: the engine calls it while holding its model lock.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

from torch import nn

from ..adapters import delete_adapter, list_adapters
from ..config import CONFIG_NAME
from ..errors import AdapterFileError, AdapterStateError, ConfigError, LorakitError
from ..io import adapter_folder, load_adapter

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class AdapterLoadError(LorakitError):
    """A known adapter's files could not be loaded: the server's fault, not the request's (500)."""


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
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"the adapter cache needs room for at least one adapter, got {capacity}")
        self.model = model
        self.capacity = capacity
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        if self.adapter_dir and not self.adapter_dir.is_dir():
            raise ConfigError(f"--adapter-dir {adapter_dir}: no such folder")
        self.known: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self._keys: dict[str, str] = {}  # loaded name -> its adapter name on the model
        for name, folder in (adapters or {}).items():
            found = adapter_folder(folder, name)  # the folder itself, or PEFT's folder/<name>
            if not (found / CONFIG_NAME).is_file():
                raise AdapterFileError(f"adapter {name!r}: {folder} has no {CONFIG_NAME}")
            self.known[check_name(name)] = found
        if self.adapter_dir:
            for sub in sorted(self.adapter_dir.iterdir()):
                if sub.name in self.known or not NAME_RE.fullmatch(sub.name) or ".." in sub.name:
                    continue
                try:
                    self.known[sub.name] = self._confined(sub.name)
                except AdapterStateError as e:
                    log.warning("%s: skipped (%s)", sub, e)

    def __contains__(self, name: object) -> bool:
        return name in self.known

    def names(self) -> list[str]:
        """Every servable adapter name, in the order they became known."""
        return list(self.known)

    def loaded_names(self) -> list[str]:
        """The adapters on the model now, least recently used first."""
        return list(self.loaded)

    def key(self, name: str) -> str:
        """The model's name for loaded adapter `name` (what `Row.adapter` must hold)."""
        return self._keys[name]

    def add(self, name: str) -> None:
        """Make `adapter_dir/name` known and load it, all or nothing: a folder that fails to load
        is not left behind as a known name. Raises `ConfigError` (bad name, no adapter dir),
        `AdapterStateError` (no such adapter folder) or the loader's error (a broken adapter)."""
        new = name not in self.known
        if new:
            self._register(name)
        try:
            self._make_room([name])
            self._load(name)
        except LorakitError:
            if new:
                del self.known[name]
            raise

    def remove(self, name: str) -> None:
        """Forget `name`, unloading it first. Raises `AdapterStateError` if unknown."""
        if name not in self.known:
            raise AdapterStateError(f"no adapter named {name!r}")
        self.unload(name)
        del self.known[name]

    def unload(self, name: str) -> None:
        """Take `name` off the model (it stays known)."""
        if name in self.loaded:
            del self.loaded[name]
            delete_adapter(self.model, self._keys.pop(name))
            log.info("unloaded adapter %s", name)

    def ensure(self, names: list[str]) -> None:
        """Load `names` (at most `capacity`), evicting the least recently used others.

        Raises `AdapterStateError` for an unknown name and `AdapterLoadError` for an adapter whose
        files fail to load (the cause chained)."""
        if len(names) > self.capacity:
            raise AdapterStateError(
                f"{len(names)} adapters needed at once but the cache holds {self.capacity}"
            )
        for name in names:
            if name not in self.known:
                raise AdapterStateError(f"no adapter named {name!r}")
        self._make_room(names)
        for name in names:
            try:
                self._load(name)
            except (AdapterStateError, AdapterLoadError):
                raise
            except LorakitError as e:
                raise AdapterLoadError(f"adapter {name!r} could not be loaded: {e}") from e

    def _make_room(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self.loaded]
        while self.loaded and len(self.loaded) + len(missing) > self.capacity:
            self.unload(next(n for n in self.loaded if n not in names))

    def _load(self, name: str) -> None:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        folder = self.known[name]
        if self.adapter_dir and folder.is_relative_to(self.adapter_dir):
            self._check_inside(name, folder)  # again: its files may have changed since it was found
        key = self._new_key(name)
        load_adapter(self.model, folder, key, activate=False)
        self.loaded[name], self._keys[name] = None, key
        log.info("loaded adapter %s from %s", name, folder)

    def _new_key(self, name: str) -> str:
        key = re.sub(r"[^A-Za-z0-9_]", "_", name)
        taken = set(list_adapters(self.model))
        while key in taken:
            key += "_"
        return key

    def _register(self, name: str) -> None:
        check_name(name)
        if self.adapter_dir is None:
            raise ConfigError(
                "this server was started without --adapter-dir, so it cannot load adapters by name"
            )
        self.known[name] = self._confined(name)

    def _confined(self, name: str) -> Path:
        """`adapter_dir/name` resolved, if it holds an adapter and neither it nor anything in it
        resolves outside `adapter_dir` (a symlink out); else `AdapterStateError`."""
        folder = (self.adapter_dir / name).resolve()
        if folder.is_dir():
            folder = adapter_folder(folder, name)  # the folder itself, or PEFT's folder/<name>
        if not (folder / CONFIG_NAME).is_file():
            raise AdapterStateError(f"no adapter named {name!r} in the adapter folder")
        self._check_inside(name, folder)
        return folder

    def _check_inside(self, name: str, folder: Path) -> None:
        for path in [folder, *folder.rglob("*")]:
            if not path.resolve().is_relative_to(self.adapter_dir):
                raise AdapterStateError(
                    f"adapter {name!r}: {path} resolves outside the adapter folder; refused "
                    "(copy the adapter into --adapter-dir instead of linking to it)"
                )
