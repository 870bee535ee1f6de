"""lorakit._storage: failed writes (a full disk above all) become one StorageError naming the path."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from lorakit._storage import writing
from lorakit.errors import StorageError

_NEEDS_DEV_FULL = pytest.mark.skipif(
    not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
    reason="needs /dev/full (a device whose every write fails with ENOSPC)",
)


def test_enospc_says_no_space_left_and_names_the_path(tmp_path):
    with pytest.raises(StorageError, match=r"out/x: no space left on the device \(\d+ MiB free in"):
        with writing(tmp_path / "out" / "x"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_torch_save_on_a_full_device_is_recognised(tmp_path):
    """What torch.save raised writing into /dev/full (when it notices at all: see checkpoint.py)."""
    with pytest.raises(
        StorageError, match="state.pt: writing failed, most likely no space left.*inline_container"
    ):
        with writing(tmp_path / "state.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@_NEEDS_DEV_FULL
def test_a_python_write_to_a_full_device(tmp_path):
    with pytest.raises(StorageError, match="no space left on the device"):
        with writing(tmp_path / "x"), open("/dev/full", "wb") as f:
            f.write(b"x" * 100_000)
            f.flush()


def test_other_os_errors_name_the_path_and_unrelated_errors_pass_through(tmp_path):
    with pytest.raises(StorageError, match=r"p: cannot write it \(Permission denied\)"):
        with writing(tmp_path / "p"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(RuntimeError, match="a bug"):
        with writing(tmp_path / "p"):
            raise RuntimeError("a bug")
