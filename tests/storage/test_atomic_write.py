"""ckptmgr.io.atomic_write: a failed write never replaces or damages what was there."""
import os
import stat

import pytest

from ckptmgr import io as storage
from ckptmgr.errors import CheckpointNotFoundError, StorageError


class _Fail(Exception):
    pass


def _targets(tmp_path, s3_url):
    return {"local": str(tmp_path / "sub" / "f.bin"), "file-url": f"file://{tmp_path}/url/f.bin",
            "memory": "memory://ckptmgr-atomic/x/f.bin", "s3": f"{s3_url}/dir/f.bin"}


@pytest.mark.parametrize("kind", ["local", "file-url", "memory", "s3"])
def test_commit_and_abort(kind, tmp_path, request):
    s3_url = request.getfixturevalue("s3") if kind == "s3" else ""
    uri = _targets(tmp_path, s3_url)[kind]
    big = os.urandom(6 * 1024 * 1024) if kind == "s3" else b"x" * 1000  # s3: a multipart upload
    with storage.atomic_write(uri) as fh:
        fh.write(big)
    with pytest.raises(_Fail):
        with storage.atomic_write(uri) as fh:
            fh.write(b"partial" * 1000)
            raise _Fail()
    with storage.open_read(uri) as fh:
        assert fh.read() == big
    assert storage.size(uri) == len(big)
    parent = uri.rsplit("/", 1)[0]
    assert storage.listdir(parent) == ["f.bin"]  # no temp names left over
    if kind == "s3":  # an aborted upload leaves nothing behind, not even a new name
        with pytest.raises(_Fail):
            with storage.atomic_write(f"{s3_url}/dir/new.bin") as fh:
                fh.write(os.urandom(6 * 1024 * 1024))
                raise _Fail()
        assert not storage.exists(f"{s3_url}/dir/new.bin")


def test_local_file_mode_follows_umask(tmp_path):
    path = tmp_path / "m.bin"
    old = os.umask(0o022)
    try:
        with storage.atomic_write(str(path)) as fh:
            fh.write(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_unwritable_destination_is_a_storage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(StorageError):
        with storage.atomic_write(str(blocker / "f")) as fh:
            fh.write(b"1")
    assert blocker.read_bytes() == b"not a directory"


def test_out_of_space_is_a_storage_error(tmp_path, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StorageError, match="out of space"):
        with storage.atomic_write(str(tmp_path / "f")) as fh:
            fh.write(b"1")
    assert os.listdir(tmp_path) == []


def test_read_errors_are_typed(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        with storage.open_read(str(tmp_path / "missing")):
            pass
    with pytest.raises(StorageError):
        with storage.open_read(str(tmp_path)):
            pass


def test_uri_helpers():
    assert storage.split_protocol("S3://b/k") == ("s3", "b/k")
    assert storage.split_protocol("/a/b") == (None, "/a/b")
    assert storage.is_local("file:///x") and storage.local_path("file:///x") == "/x"
    assert storage.join("s3://b/", "run", "/step/") == "s3://b/run/step"


def test_s3_endpoint_comes_from_the_environment(s3, monkeypatch):
    # storage passes AWS_ENDPOINT_URL to s3fs itself, so old botocore releases honour it too
    fs, path = storage.get_fs(f"{s3}/x")
    assert fs.client_kwargs.get("endpoint_url") == os.environ["AWS_ENDPOINT_URL"] or \
        getattr(fs, "endpoint_url", None) == os.environ["AWS_ENDPOINT_URL"]
