"""Atomic files and folders: a crash or an exception leaves the old content or the new, never a mix."""

import os

import pytest

from lorakit import _atomic
from lorakit._atomic import atomic_folder, clean_stale, recover_folder


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "rename-aside"])
def test_atomic_folder_replaces_the_whole_folder(tmp_path, monkeypatch, exchange):
    if not exchange:  # the fallback for systems without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    with atomic_folder(tmp_path / "a") as t:
        (t / "old.txt").write_text("1")
    with atomic_folder(tmp_path / "a") as t:
        (t / "new.txt").write_text("2")
    assert os.listdir(tmp_path) == ["a"]
    assert os.listdir(tmp_path / "a") == ["new.txt"]


def test_atomic_folder_keeps_the_old_folder_on_error(tmp_path):
    with atomic_folder(tmp_path / "a") as t:
        (t / "old.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "a") as t:
        (t / "new.txt").write_text("2")
        raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == ["a"]
    assert (tmp_path / "a" / "old.txt").read_text() == "1"


def test_a_crash_between_the_fallback_renames_is_recovered(tmp_path):
    (tmp_path / ".a.old-999999-0").mkdir()
    (tmp_path / ".a.old-999999-0" / "old.txt").write_text("1")
    recover_folder(tmp_path / "a")
    assert (tmp_path / "a" / "old.txt").read_text() == "1"


def test_atomic_folder_refuses_a_file(tmp_path):
    (tmp_path / "a").write_text("not a folder")
    with pytest.raises(NotADirectoryError), atomic_folder(tmp_path / "a"):
        pass
    assert (tmp_path / "a").read_text() == "not a folder"


def test_clean_stale_removes_only_dead_writers_leftovers(tmp_path):
    dead = tmp_path / ".a.tmp-999999-0"
    live = tmp_path / f".b.tmp-{os.getpid()}-0"
    dead.mkdir()
    live.mkdir()
    (tmp_path / ".c.tmp-999999").write_text("x")
    assert sorted(p.name for p in clean_stale(tmp_path)) == [".a.tmp-999999-0", ".c.tmp-999999"]
    assert sorted(os.listdir(tmp_path)) == [live.name]
