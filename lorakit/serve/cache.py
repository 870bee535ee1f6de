"""The server's adapters: which names exist (given at start or found in the allowed folder) and
which are loaded on the model now, with a size limit and least-recently-used eviction.

Run-time loading goes by name only: the folder is `adapter_dir/name`, and a name that could step
outside that folder (`..`, `/`, a leading dot) is refused, as is a folder or file in it that
resolves outside (a symlink): checked when the folder is found and again when it is loaded.

A served name is public (any `NAME_RE` name, dots included, e.g. `llama-3.1-math`); on the model
the adapter is loaded under a key made of letters, digits and `_` only, because adapter names
are module keys, which cannot hold a '.'.

Besides the count (`capacity`), `max_bytes` bounds the memory the loaded adapters take: their
parameters, measured once loaded, plus the copy of them that mixed-adapter batches keep stacked in
every linear layer (`LoraLinear.stack_nbytes`: about as much again, more when ranks differ, since
the stack pads every rank to the largest). Adapters in use by running rows are `pinned`: never evicted;
removing one forgets its name at once (new requests get a 404) and takes it off the model once
its last row has left (`drain`).

Not thread-safe on its own: the engine calls it while holding its model lock.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from pathlib import Path

from torch import nn

from .._state import wrappers
from ..adapters import delete_adapter, list_adapters
from ..config import CONFIG_NAME, LoraConfig
from ..errors import AdapterFileError, AdapterStateError, ConfigError, LorakitError
from ..io import adapter_folder, adapter_state_dict, first_non_finite, load_adapter, read_adapter_tensors
from ..layers import LoraLinear

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


class AdapterLoadError(LorakitError):
    """A known adapter's files could not be loaded: the server's fault, not the request's (500)."""


class NoRoom(LorakitError):
    """The adapter does not fit beside the adapters in use now; it may once their rows finish."""


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
        max_bytes: int | None = None,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"the adapter cache needs room for at least one adapter, got {capacity}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise ConfigError(f"--max-loaded-bytes must be a positive number of bytes, got {max_bytes!r}")
        self.model = model
        self.capacity, self.max_bytes = capacity, max_bytes
        self.sizes: dict[str, int] = {}  # loaded name -> bytes of its parameters
        self.draining: set[str] = set()  # model keys of removed adapters that rows still use
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

    def add(self, name: str, pinned: set[str] | frozenset = frozenset(), path: str | None = None) -> None:
        """Make `adapter_dir/name` (or the folder `path`, which must lie inside `adapter_dir`)
        known and load it, all or nothing: a folder that fails to load is not left behind as a
        known name. Raises `ConfigError` (bad name, no adapter dir, a path outside it),
        `AdapterStateError` (no such adapter folder), `NoRoom`, or the loader's error."""
        new = name not in self.known
        if new:
            self._register(name, path)
        try:
            self._fit(name, pinned)
        except LorakitError:
            if new:
                del self.known[name]
            raise

    def remove(self, name: str, pinned: set[str] | frozenset = frozenset()) -> None:
        """Forget `name`, unloading it first (or, if its model key is `pinned`, once `drain` finds
        it unused). Raises `AdapterStateError` if unknown."""
        if name not in self.known:
            raise AdapterStateError(f"no adapter named {name!r}")
        if name in self.loaded and self._keys[name] in pinned:
            del self.loaded[name], self.sizes[name]
            self.draining.add(self._keys.pop(name))
        else:
            self.unload(name)
            self._restack()
        del self.known[name]

    def unload(self, name: str) -> None:
        """Take `name` off the model (it stays known)."""
        if name in self.loaded:
            del self.loaded[name], self.sizes[name]
            delete_adapter(self.model, self._keys.pop(name))
            log.info("unloaded adapter %s", name)

    def drain(self, pinned: set[str] | frozenset) -> None:
        """Take removed adapters that no row uses any more (not `pinned`) off the model."""
        gone = sorted(self.draining - set(pinned))
        for key in gone:
            self.draining.discard(key)
            delete_adapter(self.model, key)
        if gone:
            self._restack()

    def loaded_bytes(self) -> int:
        """Bytes of the loaded adapters' parameters and of the layers' stacks of them."""
        return sum(self.sizes.values()) + self._stack_bytes()

    def _stack_bytes(self, keys: list[str] | None = None) -> int:
        """Bytes of the stacks of adapters `keys` (default: all on the model) in every layer."""
        return sum(m.stack_nbytes(keys) for m in wrappers(self.model) if isinstance(m, LoraLinear))

    def load(self, name: str, pinned: set[str] | frozenset = frozenset()) -> str:
        """Load known adapter `name` (if it is not loaded), evicting least recently used adapters
        whose model key is not `pinned`; return its model key. Raises `NoRoom` while the pinned
        adapters leave no room, `AdapterStateError` for an unknown name or one larger than
        `max_bytes` on its own, and `AdapterLoadError` for files that fail to load."""
        if name not in self.known:
            raise AdapterStateError(f"no adapter named {name!r}")
        try:
            return self._fit(name, pinned)
        except (AdapterStateError, AdapterLoadError, NoRoom):
            raise
        except LorakitError as e:
            raise AdapterLoadError(f"adapter {name!r} could not be loaded: {e}") from e

    def _fit(self, name: str, pinned: set[str] | frozenset) -> str:
        """`load` without wrapping the loader's errors."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self._keys[name]
        before = list_adapters(self.model)
        try:
            return self._evict_and_load(name, pinned)
        finally:
            if list_adapters(self.model) != before:
                self._restack()

    def _evict_and_load(self, name: str, pinned: set[str] | frozenset) -> str:
        free = [n for n in self.loaded if self._keys[n] not in pinned]
        if len(self.loaded) - len(free) >= self.capacity:
            raise NoRoom(f"adapter {name!r}: all {self.capacity} cache slots hold adapters in use")
        while len(self.loaded) >= self.capacity:
            self.unload(free.pop(0))
        self._load(name)
        while self.max_bytes and self.loaded_bytes() > self.max_bytes and free:
            self.unload(free.pop(0))
        if self.max_bytes and self.loaded_bytes() > self.max_bytes:
            size = self.sizes[name] + self._stack_bytes([self._keys[name]])  # what it takes alone
            self.unload(name)
            if size > self.max_bytes:
                raise AdapterStateError(
                    f"adapter {name!r} takes {size} bytes (its parameters and their stacked copy), "
                    f"more than --max-loaded-bytes {self.max_bytes}"
                )
            raise NoRoom(f"adapter {name!r} ({size} bytes) does not fit beside the adapters in use")
        return self._keys[name]

    def _restack(self) -> None:
        """Build every layer's stacks of the adapters now on the model (`inference_stacks`), so
        the first mixed-adapter batch after a change does not stall on the build (0.1-0.3 s for
        8 adapters on SmolLM2-135M, 2 CPU cores)."""
        for module in wrappers(self.model):
            if isinstance(module, LoraLinear):
                module.inference_stacks()

    def ensure(self, names: list[str]) -> None:
        """Load `names` (at most `capacity`), evicting the least recently used others.

        Raises `AdapterStateError` for an unknown name (or names that do not fit together) and
        `AdapterLoadError` for an adapter whose files fail to load (the cause chained)."""
        if len(names) > self.capacity:
            raise AdapterStateError(
                f"{len(names)} adapters needed at once but the cache holds {self.capacity}"
            )
        for name in names:
            if name not in self.known:
                raise AdapterStateError(f"no adapter named {name!r}")
        for name in names:
            pinned = {self._keys[n] for n in names if n in self.loaded}
            try:
                self.load(name, pinned)
            except NoRoom as e:
                raise AdapterStateError(f"{e} (--max-loaded-bytes is too small for this batch)") from None

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
        self.sizes[name] = sum(t.nbytes for t in adapter_state_dict(self.model, key).values())
        log.info("loaded adapter %s from %s", name, folder)

    def _new_key(self, name: str) -> str:
        key = re.sub(r"[^A-Za-z0-9_]", "_", name)
        taken = set(list_adapters(self.model))
        while key in taken:
            key += "_"
        return key

    def precheck(self, name: str, path: str | None = None) -> None:
        """Read and check the files of adapter `name` (known, or `adapter_dir/name`, or `path` in
        it) without touching the model: the slow part of a load, safe off the engine thread.
        Raises what `add` raises for a bad name or folder, and the reader's errors."""
        folder = self.known[name] if name in self.known else self._locate(name, path)
        LoraConfig.from_json_file(folder / CONFIG_NAME)
        bad = first_non_finite(read_adapter_tensors(folder))
        if bad is not None:
            raise AdapterFileError(f"{folder}: tensor {bad} holds NaN or Inf values; the adapter is corrupt")

    def _register(self, name: str, path: str | None = None) -> None:
        self.known[name] = self._locate(name, path)

    def _locate(self, name: str, path: str | None) -> Path:
        check_name(name)
        if self.adapter_dir is None:
            raise ConfigError(
                "this server was started without --adapter-dir, so it cannot load adapters at run time"
            )
        if path is None:
            return self._confined(name)
        given = (self.adapter_dir / path).resolve()  # an absolute `path` replaces adapter_dir
        if given == self.adapter_dir or not given.is_relative_to(self.adapter_dir):
            raise ConfigError(
                f"lora_path {path!r} is outside the allowed adapter folder; put the adapter in "
                "--adapter-dir and give its path there"
            )
        return self._confined(str(given.relative_to(self.adapter_dir)))

    def _confined(self, name: str) -> Path:
        """`adapter_dir/name` resolved, if it holds an adapter and neither it nor anything in it
        resolves outside `adapter_dir` (a symlink out); else `AdapterStateError`."""
        folder = (self.adapter_dir / name).resolve()
        if folder.is_dir():
            folder = adapter_folder(folder, Path(name).name)  # the folder itself, or PEFT's folder/<name>
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
