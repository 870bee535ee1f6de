"""lorakit.errors: the hierarchy, and `storage_errors` naming why a write failed."""

import errno
from collections import namedtuple

import pytest

from lorakit import errors
from lorakit.errors import LorakitError, StorageError, storage_errors


def _raise_inside(path, exc):
    with storage_errors(path):
        raise exc


@pytest.mark.parametrize(
    "exc, says",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "no space left on device"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EIO, "Input/output error"), "the write failed"),
        # safetensors hides the errno in its message (measured on a full tmpfs)
        (
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
            "no space",
        ),
    ],
)
def test_failed_writes_become_storage_errors_naming_the_path(tmp_path, exc, says):
    with pytest.raises(StorageError, match=f"cannot write {tmp_path / 'x'}: {says}") as info:
        _raise_inside(tmp_path / "x", exc)
    assert isinstance(info.value, LorakitError) and isinstance(info.value, OSError)
    assert info.value.__cause__ is exc


def test_torch_writer_failure_on_a_full_disk_says_no_space(tmp_path, monkeypatch):
    """torch.save on a full disk says only `inline_container.cc ... unexpected pos` (measured)."""
    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: usage(100, 100, 0))
    with pytest.raises(StorageError, match="no space left on device"):
        _raise_inside(tmp_path / "ckpt" / "state.pt", exc)
    monkeypatch.setattr(errors.shutil, "disk_usage", lambda p: usage(1 << 40, 0, 1 << 40))
    with pytest.raises(StorageError, match="the write failed"):
        _raise_inside(tmp_path / "ckpt" / "state.pt", exc)


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("k"), errors.ConfigError("mine")])
def test_other_errors_pass_through_unchanged(tmp_path, exc):
    with pytest.raises(type(exc)) as info:
        _raise_inside(tmp_path, exc)
    assert info.value is exc
