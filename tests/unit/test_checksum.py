"""Checksums: the named algorithms, hashing while writing and reading, and manifests that name their checksum."""
import hashlib
import io
import json
import os

import pytest
import xxhash

from ckptmgr.errors import CheckpointFormatError, CorruptCheckpointError
from ckptmgr.format.checksum import (
    CHECKSUMS,
    DEFAULT_CHECKSUM,
    FileEntry,
    HashingReader,
    HashingWriter,
    StreamDigest,
    check_checksum,
    digest_of,
)
from ckptmgr.format.manifest import Manifest, version_for

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "v0_1")
# sizes around the inline piece (512 KiB) and the threaded piece (8 MiB), and the empty stream
SIZES = [0, 1, 512 * 1024 - 1, 512 * 1024, 3 * 1024 * 1024 + 5, 8 * 1024 * 1024 + 3]


def _reference(data, name):
    return hashlib.sha256(data).hexdigest() if name == "sha256" else xxhash.xxh3_128(data).hexdigest()


def test_the_default_is_xxh3_and_unknown_names_are_refused_naming_the_choices():
    assert DEFAULT_CHECKSUM == "xxh3" and set(CHECKSUMS) == {"xxh3", "sha256"}
    for bad in ("md5", "XXH3", "", None, 3):
        with pytest.raises(ValueError, match="'xxh3', 'sha256'"):
            check_checksum(bad)


@pytest.mark.parametrize("name", CHECKSUMS)
@pytest.mark.parametrize("size", SIZES)
def test_writer_and_reader_hash_exactly_the_bytes_that_pass(name, size):
    data = os.urandom(size)
    out = io.BytesIO()
    writer = HashingWriter(out, name)
    writer.write(data[: size // 3])
    writer.write(memoryview(data)[size // 3:])
    assert out.getvalue() == data
    assert writer.entry() == FileEntry(size, _reference(data, name)) == FileEntry(size, digest_of(data, name))
    # read back through readinto in odd-sized steps, then finish() drains the rest
    reader = HashingReader(io.BytesIO(data), name)
    buf = bytearray(size // 2 + 1)
    got = reader.readinto(buf)
    assert bytes(buf[:got]) == data[:got]
    assert reader.finish() == FileEntry(size, _reference(data, name))


def test_a_reader_without_a_checksum_only_counts():
    assert HashingReader(io.BytesIO(b"x" * 5000), None).finish() == FileEntry(5000, "")


@pytest.mark.parametrize("name", CHECKSUMS)
def test_stream_digest_keeps_the_order_of_large_buffers(name):
    parts = [os.urandom(n) for n in (3 * 1024 * 1024, 17, 2 * 1024 * 1024)]
    digest = StreamDigest(name)
    for part in parts:
        digest.update(memoryview(part))
    assert digest.hexdigest() == _reference(b"".join(parts), name)
    assert digest.inline == (name == "xxh3")  # xxh3 hashes on the caller's thread, sha256 beside it


def _manifest(checksum, digits):
    return Manifest(step=3, files={"model.safetensors": FileEntry(10, "ab" * (digits // 2))},
                    components={"model": "model.safetensors"}, checksum=checksum)


def test_an_xxh3_manifest_names_its_checksum_and_is_version_2():
    m = _manifest("xxh3", 32)
    body = json.loads(m.to_bytes())
    assert body["checksum"] == "xxh3" and body["format_version"] == 2 == version_for("xxh3")
    assert body["files"]["model.safetensors"] == {"size": 10, "xxh3": "ab" * 16}
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m and back.checksum == "xxh3"


def test_a_sha256_manifest_keeps_the_0_1_layout_byte_for_byte():
    with open(os.path.join(FIXTURE, "run", "step_00000003", "manifest.json"), "rb") as fh:
        written_by_0_1 = fh.read()
    m = Manifest.from_bytes(written_by_0_1)
    assert m.checksum == "sha256" and m.format_version == 1 == version_for("sha256")
    assert m.to_bytes() == written_by_0_1
    fresh = json.loads(_manifest("sha256", 64).to_bytes())
    assert "checksum" not in fresh and fresh["format_version"] == 1 and "sha256" in fresh["files"]["model.safetensors"]


def test_an_unknown_checksum_asks_for_an_upgrade_and_a_wrong_digest_is_refused():
    m = _manifest("xxh3", 32)
    m.checksum = "blake9"
    with pytest.raises(CheckpointFormatError, match="upgrade ckptmgr"):
        Manifest.from_bytes(m.to_bytes())
    wrong_length = _manifest("xxh3", 64)  # a sha256-sized digest under an xxh3 manifest
    with pytest.raises(CorruptCheckpointError, match="invalid file entry"):
        Manifest.from_bytes(wrong_length.to_bytes())
