"""The one exception hierarchy of lorakit.

Every error lorakit raises on purpose is a :class:`LorakitError`, so callers can catch one
type. Messages name the file, key or module at fault and say what to do about it.
`storage_errors` turns the many ways a write fails (an errno, safetensors' or torch's own
messages) into one `StorageError`.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A LoRA or training configuration is invalid (bad value, unknown target, wrong type)."""


class TargetNotFoundError(ConfigError):
    """A configuration's target modules match nothing in the model."""


class AdapterFileError(LorakitError):
    """An adapter or checkpoint file is missing, malformed, corrupt or unsafe to read."""


class ShapeMismatchError(LorakitError):
    """An adapter or checkpoint does not fit the model it is loaded onto."""


class AdapterStateError(LorakitError, KeyError):
    """An adapter name is unknown, duplicated, or used in a state that forbids the call."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class QuantizationError(LorakitError, ValueError):
    """A quantization input or state is invalid (shape, dtype, block size, corrupt state)."""


class DataError(LorakitError, ValueError):
    """A dataset file or record is malformed, empty, or missing a needed column."""


class TrainingError(LorakitError):
    """Training cannot go on (a non-finite loss, for example); the last good checkpoint is kept."""


class StorageError(LorakitError, OSError):
    """A file or folder could not be written (disk full, read-only, no permission); nothing changed."""


_REASONS = {
    errno.ENOSPC: "no space left on device; free some space and save again",
    errno.EDQUOT: "no space left on device (disk quota exceeded); free some space and save again",
    errno.EROFS: "the file system is read-only; save somewhere else",
    errno.EACCES: "permission denied; save somewhere you may write",
    errno.EPERM: "permission denied; save somewhere you may write",
}
# what writers that hide the errno say (safetensors' Rust I/O error, torch's zip writer)
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "storagefull")
_WRITER_TEXT = ("error while serializing", "inline_container.cc", "pytorchstreamwriter")


@contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Inside, a failed write becomes a `StorageError` naming `path` and the cause, whichever
    writer hit it (a disk-full error says "no space left on device" even where torch's writer only
    says `inline_container.cc ... unexpected pos`); other exceptions pass through."""
    try:
        yield
    except LorakitError:
        raise
    except Exception as e:
        text = str(e).lower()
        if isinstance(e, OSError) and e.errno in _REASONS:
            reason = _REASONS[e.errno]
        elif any(s in text for s in _DISK_FULL_TEXT) or (
            any(s in text for s in _WRITER_TEXT) and _disk_nearly_full(path)
        ):
            reason = _REASONS[errno.ENOSPC]
        elif isinstance(e, OSError) or any(s in text for s in _WRITER_TEXT):
            reason = "the write failed"
        else:
            raise
        raise StorageError(f"cannot write {os.fspath(path)}: {reason} ({e})") from e


def _disk_nearly_full(path: str | os.PathLike, margin: int = 1 << 24) -> bool:
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


# The one table from error class to HTTP status (the server's answer to a request that raised it).
HTTP_STATUS: dict[type[LorakitError], int] = {
    AdapterStateError: 404,  # an unknown adapter name
    AdapterFileError: 422,  # the adapter exists but its files are broken or unsafe
    ShapeMismatchError: 422,  # the adapter does not fit the model
    TargetNotFoundError: 422,
    ConfigError: 400,
    DataError: 400,
    QuantizationError: 400,
}


def http_status(exc: BaseException) -> int:
    """The HTTP status for `exc`: that of its nearest class in `HTTP_STATUS`, else 500."""
    return next((HTTP_STATUS[c] for c in type(exc).__mro__ if c in HTTP_STATUS), 500)
