"""Clear errors for failed writes: a full disk reported by the OS, by safetensors or by `torch.save`
(whose `inline_container.cc` message never says why) becomes one `StorageError` naming the path."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LorakitError, StorageError

_FULL = (errno.ENOSPC, errno.EDQUOT)
# what torch.save and safetensors say when a write fails (they drop the errno)
_WRITE_FAILED = ("inline_container", "file write failed", "No space left", "StorageFull", "code: 28")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Run the block that writes `path`; turn a failed write into `StorageError` naming `path`."""
    try:
        yield
    except LorakitError:
        raise
    except OSError as e:
        if e.errno in _FULL:
            raise StorageError(f"{path}: no space left on the device ({_free(path)}); free some space") from e
        raise StorageError(f"{path}: cannot write it ({e.strerror or e})") from e
    except Exception as e:  # torch's RuntimeError, safetensors' SafetensorError
        if not any(s in str(e) for s in _WRITE_FAILED):
            raise
        raise StorageError(
            f"{path}: writing failed, most likely no space left on the device ({_free(path)}); "
            f"free some space (the writer said: {e})"
        ) from e


def _free(path: str | Path) -> str:
    for folder in (Path(path), *Path(path).parents):
        if folder.is_dir():
            try:
                return f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {folder}"
            except OSError:
                break
    return "free space unknown"
