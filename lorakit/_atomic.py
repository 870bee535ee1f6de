"""Atomic writes of files and whole folders.

A file: write a temporary file in the target's folder, fsync it, rename it over the target, fsync
the folder. A folder: build it complete under a temporary name beside the target, then swap the two
in one `renameat2(RENAME_EXCHANGE)` call (Linux), so a crash at any moment leaves either the old
folder or the new one, never a mix. Where the exchange call is missing, the old folder is first
renamed aside (`.NAME.old-PID`) and `recover_folder` puts it back if a crash hit between the renames.

Temporary names carry the writer's pid (`.NAME.tmp-PID-N`), so `clean_stale` can remove what a
killed writer left behind without touching a live writer's work.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_counter = itertools.count()
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-\d+)?$")


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{next(_counter)}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it replaces `path` atomically.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result over `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside `path`; on a clean exit it replaces `path` as a whole.

    Everything written inside is fsynced before the swap. On an exception the temporary folder is
    removed and `path` is left exactly as it was. Raises `NotADirectoryError` if `path` is a file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new folder on failure, the old one on success
    _fsync_dir(path.parent)


def _swap_in(new: Path, path: Path) -> None:
    """Make `new` be `path`; afterwards `new` names the old folder (or nothing)."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        return
    old = _temp_name(path, "old")
    os.rename(path, old)
    os.rename(new, path)
    os.rename(old, new)  # so the caller's cleanup removes it


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def recover_folder(path: str | Path) -> None:
    """Put back a folder that a crash left renamed aside mid-swap (only without RENAME_EXCHANGE)."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds:
        os.rename(olds[-1], path)


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in `folder`; return them.

    Only entries whose writer (the pid in the name) no longer runs are removed; a folder renamed
    aside mid-swap is first put back by `recover_folder`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        m = _STALE.match(entry.name)
        if m is None or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old":
            recover_folder(folder / m["name"])
            if not entry.exists():
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
