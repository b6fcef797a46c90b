"""The manifest: what it records, and that any changed byte is caught."""
import json

import pytest

from ckptmgr.errors import CheckpointFormatError, ChecksumError, CorruptCheckpointError
from ckptmgr.format.manifest import FORMAT_VERSION, FileEntry, Manifest, check_sizes, compare

SHA = "ab" * 32


def _manifest(**kw):
    fields = dict(step=7, files={"model.safetensors": FileEntry(10, SHA), "rev-1/extra.json": FileEntry(3, "cd" * 32)},
                  components={"model": "model.safetensors", "rng": {"0": "rng-rank00000.safetensors"}},
                  metrics={"loss": 0.5}, world_size=2, time="2026-01-01T00:00:00+00:00")
    fields.update(kw)
    return Manifest(**fields)


def test_round_trip_keeps_every_field():
    m = _manifest()
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m and back.file_for("model") == "model.safetensors" and back.rng_file(0).startswith("rng")
    assert back.rng_file(5) is None and back.file_for("optimizer") is None


@pytest.mark.parametrize("offset", [0, 20, 60, -3])
def test_any_changed_byte_is_detected(offset):
    data = bytearray(_manifest().to_bytes())
    data[offset] ^= 0x01
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_bytes(bytes(data))


def test_a_consistent_edit_without_its_checksum_is_refused():
    body = json.loads(_manifest().to_bytes())
    body["metrics"]["loss"] = 0.1   # looks like a real manifest, but its own checksum no longer matches
    data = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()
    with pytest.raises(ChecksumError):
        Manifest.from_bytes(data)


def test_newer_format_versions_are_refused_with_a_hint():
    m = _manifest(format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointFormatError, match="upgrade ckptmgr"):
        Manifest.from_bytes(m.to_bytes())


@pytest.mark.parametrize("name", ["../escape", "/abs", ".hidden", "a/b/c", "x\\y"])
def test_file_names_that_could_escape_the_step_are_refused(name):
    m = _manifest(files={name: FileEntry(1, SHA)})
    with pytest.raises(CorruptCheckpointError, match="invalid file entry"):
        Manifest.from_bytes(m.to_bytes())


def test_sizes_and_checksums_are_compared():
    m = _manifest()
    check_sizes(m, {"model.safetensors": 10, "rev-1/extra.json": 3, "other": 1}, "src")  # extra files are fine
    with pytest.raises(CorruptCheckpointError, match="missing"):
        check_sizes(m, {"model.safetensors": 10}, "src")
    with pytest.raises(ChecksumError, match="9 bytes"):
        check_sizes(m, {"model.safetensors": 9, "rev-1/extra.json": 3}, "src")
    compare("f", FileEntry(10, SHA), FileEntry(10, SHA), "src", "sha256")
    with pytest.raises(ChecksumError, match="f has sha256"):
        compare("f", FileEntry(10, "00" * 32), FileEntry(10, SHA), "src", "sha256")
