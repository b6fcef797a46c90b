"""S3 through fsspec/s3fs against the real moto server (multipart boundaries included)."""
import hashlib
import os

import pytest
import torch

import ckptmgr
from ckptmgr import io as storage
from ckptmgr.errors import CheckpointNotFoundError

MIB = 1024 * 1024


@pytest.mark.parametrize("nbytes", [0, 5 * MIB - 1, 5 * MIB + 1, 12 * MIB],
                         ids=["empty", "5MiB-1", "5MiB+1", "12MiB"])
def test_raw_bytes_round_trip(s3, nbytes):
    data = os.urandom(nbytes)
    url = f"{s3}/raw/blob-{nbytes}.bin"
    options = {"default_block_size": 5 * MIB}  # S3's smallest part: sizes around it hit every path
    with storage.atomic_write(url, options) as fh:
        for start in range(0, nbytes, 3 * MIB):  # several writes, like a streaming serializer
            fh.write(data[start:start + 3 * MIB])
    assert storage.size(url) == nbytes
    fs, path = storage.get_fs(url)
    if nbytes > 5 * MIB:  # past one block s3fs switches to a multipart upload: its ETag ends in -<parts>
        assert "-" in fs.info(path)["ETag"]
    with storage.open_read(url) as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()


def test_failed_upload_leaves_nothing(s3):
    url = f"{s3}/raw/aborted.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_write(url) as fh:
            fh.write(os.urandom(6 * MIB))
            raise RuntimeError("writer died")
    assert not storage.exists(url)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip_over_multipart_size(s3, suffix):
    model = torch.nn.Linear(1024, 1536)  # ~6 MiB of float32: a multipart upload
    url = f"{s3}/ckpt/big{suffix}"
    ckptmgr.save_checkpoint(model, url, meta={"epoch": 3})
    assert storage.size(url) > 5 * MIB
    ckpt = ckptmgr.CheckpointLoader.load_checkpoint(url, map_location="cpu")
    assert ckpt["meta"]["epoch"] == 3
    assert torch.equal(ckpt["state_dict"]["weight"], model.weight.detach())
    fresh = torch.nn.Linear(1024, 1536)
    ckptmgr.load_checkpoint(fresh, url, strict=True)
    assert torch.equal(fresh.bias, model.bias)


def test_storage_options_reach_s3fs(s3, monkeypatch, convnet):
    url = f"{s3}/opts/w.pth"
    ckptmgr.save_checkpoint(convnet, url)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # now only storage_options know where the server is
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    ckpt = ckptmgr.CheckpointLoader.load_checkpoint(
        url, storage_options={"endpoint_url": endpoint, "key": "testing", "secret": "testing"})
    assert torch.equal(ckpt["state_dict"]["conv.weight"], convnet.conv.weight)


def test_missing_object_is_not_found(s3):
    with pytest.raises(CheckpointNotFoundError):
        ckptmgr.CheckpointLoader.load_checkpoint(f"{s3}/nope/missing.pth")


def test_cached_path_copies_an_s3_object_once(s3):
    data = os.urandom(MIB + 5)
    url = f"{s3}/cache/obj.bin"
    with storage.atomic_write(url) as fh:
        fh.write(data)
    path = ckptmgr.cached_path(url)
    with open(path, "rb") as fh:
        assert fh.read() == data
    storage.remove(url)
    assert ckptmgr.cached_path(url) == path  # served from the cache now
