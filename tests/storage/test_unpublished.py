"""Files of a step being written: no per-file atomicity where the commit provides it, and writeback started early."""
import os

import pytest

from ckptmgr.errors import StorageError
from ckptmgr.io import writeback
from ckptmgr.io.access import open_store


class _Fail(Exception):
    pass


def test_a_local_unpublished_file_is_written_in_place_and_removed_when_the_body_fails(tmp_path):
    store = open_store(str(tmp_path / "step"))
    with store.write_unpublished("a.bin") as fh:
        fh.write(b"x" * 1000)
    assert os.listdir(store.root) == ["a.bin"] and store.read_bytes("a.bin") == b"x" * 1000  # no temp name
    assert oct(os.stat(store.path("a.bin")).st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(StorageError, match="a.bin"):   # never over an existing file: a step's files are new
        with store.write_unpublished("a.bin"):
            pass
    with pytest.raises(_Fail):
        with store.write_unpublished("b.bin") as fh:
            fh.write(b"partial")
            raise _Fail()
    assert os.listdir(store.root) == ["a.bin"]


def test_an_object_store_writes_unpublished_files_whole(tmp_path):
    store = open_store(f"memory://ckptmgr-unpublished-{os.getpid()}/step")
    with pytest.raises(_Fail):
        with store.write_unpublished("a.bin") as fh:
            fh.write(b"partial")
            raise _Fail()
    assert not store.exists("a.bin")
    with store.write_unpublished("a.bin") as fh:
        fh.write(b"whole")
    assert store.read_bytes("a.bin") == b"whole"


def test_writeback_is_started_every_few_mebibytes_and_the_bytes_are_unchanged(tmp_path, monkeypatch):
    if writeback._sync_file_range is None:
        pytest.skip("no sync_file_range on this platform: files are plain ones")
    calls = []
    real = writeback._sync_file_range
    monkeypatch.setattr(writeback, "_sync_file_range", lambda fd, off, n, flags: calls.append((off, n)) or real(
        fd, off, n, flags))
    data = os.urandom(3 * writeback.WRITEBACK_EVERY + 123)
    store = open_store(str(tmp_path))
    with store.write_unpublished("big.bin") as fh:
        for start in range(0, len(data), 1 << 20):
            fh.write(data[start:start + (1 << 20)])
    assert store.read_bytes("big.bin") == data
    every = writeback.WRITEBACK_EVERY
    assert calls == [(0, every), (every, every), (2 * every, every)]  # consecutive ranges, none twice


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
