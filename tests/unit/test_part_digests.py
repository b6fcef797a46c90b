"""Part digests: a large file's manifest entry also holds the checksum of each 4 MiB part, checked part by part."""
import json
import random

import pytest
import torch

from ckptmgr import CheckpointManager
from ckptmgr.errors import ChecksumError, CorruptCheckpointError
from ckptmgr.format import checksum
from ckptmgr.format.checksum import PART, FileEntry, HashingReader, HashingWriter, digest_of
from ckptmgr.format.manifest import Manifest, compare
from ckptmgr.step.records import RankFiles

HEAD = 1000


def _written(tmp_path, size, name="xxh3", parts=True, writes=(HEAD,)):
    """A file of ``size`` random bytes written through a HashingWriter in uneven writes; (path, data, entry)."""
    data = random.Random(size).randbytes(size)
    path = tmp_path / "data.bin"
    with open(path, "wb") as fh:
        writer = HashingWriter(fh, name, parts=parts)
        at = 0
        for n in list(writes) + [size]:
            writer.write(data[at:at + n])
            at = min(size, at + n)
        entry = writer.entry()
    return path, data, entry


def _read_back(path, entry, cuts, spy=None):
    """Read the file as a restore does: a header in order, views filled (on threads when large), the rest in order."""
    size = entry.size
    body = size - HEAD - 77
    sizes = cuts + [body - sum(cuts)]
    bufs = [bytearray(n) for n in sizes]
    with open(path, "rb") as fh:
        reader = HashingReader(fh, "xxh3", entry)
        reader.read(HEAD)
        reader.fill([(f"t{i}", memoryview(b)) for i, b in enumerate(bufs)])
        got = reader.finish()
    return b"".join(bufs), got


def test_a_large_file_records_the_digest_of_each_part_beside_the_whole_file_digest(tmp_path):
    size = 2 * PART + 12345
    _, data, entry = _written(tmp_path, size, writes=(HEAD, 3 * PART // 2 + 7))  # writes that straddle parts
    assert entry.digest == digest_of(data, "xxh3")
    assert entry.part_size == PART
    assert entry.parts == tuple(digest_of(data[i:i + PART], "xxh3") for i in range(0, size, PART))
    assert len(entry.parts) == 3


@pytest.mark.parametrize("size,name,parts", [(PART, "xxh3", True), (3 * PART, "sha256", True),
                                             (3 * PART, "xxh3", False)])
def test_small_files_sha256_and_writers_not_asked_record_no_parts(tmp_path, size, name, parts):
    _, data, entry = _written(tmp_path, size, name=name, parts=parts)
    assert entry == FileEntry(size, digest_of(data, name)) and entry.parts == ()


def test_a_threaded_read_checks_every_part_on_the_thread_that_read_it(tmp_path, monkeypatch):
    calls = []
    real = checksum.read_pieces

    def spy(fd, start, pieces, landed, n, segments=None):
        calls.append(segments)
        return real(fd, start, pieces, landed, max(n, 3), segments)
    monkeypatch.setattr(checksum, "read_pieces", spy)
    size = 3 * PART + 54321
    path, data, entry = _written(tmp_path, size)
    filled, got = _read_back(path, entry, [5, PART + 3, 700_001])
    assert filled == data[HEAD:size - 77]
    assert calls and calls[0], "the read was not split by part"
    assert got.parts == entry.parts and got.digest == ""  # verified part by part, not as one stream
    compare("data.bin", got, entry, "src", "xxh3")


@pytest.mark.parametrize("where", [HEAD // 2, HEAD + 10, PART + 1, 2 * PART + 100, None])
def test_a_flipped_byte_fails_the_part_that_holds_it_and_the_error_names_its_bytes(tmp_path, where):
    size = 3 * PART + 54321
    path, data, entry = _written(tmp_path, size)
    where = size - 5 if where is None else where  # the last bytes are read in order by finish()
    raw = bytearray(data)
    raw[where] ^= 0x10
    path.write_bytes(bytes(raw))
    _, got = _read_back(path, entry, [PART])
    first = where // PART * PART
    with pytest.raises(ChecksumError, match=f"has xxh3 [0-9a-f]+[.]+ in bytes {first}-{min(first + PART, size) - 1} "):
        compare("data.bin", got, entry, "src", "xxh3")


def test_a_truncated_file_yields_no_part_digests_that_could_match(tmp_path):
    size = 3 * PART + 54321
    path, data, entry = _written(tmp_path, size)
    cut = PART + 999
    path.write_bytes(data[:cut])
    with pytest.raises(CorruptCheckpointError, match="ends early"):
        _read_back(path, entry, [PART])
    with open(path, "rb") as fh:  # as step/files does: finish() after the error, then compare
        reader = HashingReader(fh, "xxh3", entry)
        reader.read(HEAD)
        with pytest.raises(CorruptCheckpointError):
            reader.fill([("t", memoryview(bytearray(size - HEAD)))])
        got = reader.finish()
    assert got.size == cut and got.parts == () and got.digest == ""
    with pytest.raises(ChecksumError, match=f"is {cut} bytes"):
        compare("data.bin", got, entry, "src", "xxh3")


def test_parts_travel_through_the_manifest_and_the_rank_reports(tmp_path):
    _, _, entry = _written(tmp_path, 2 * PART + 5)
    manifest = Manifest(step=1, files={"model.safetensors": entry, "small.json": FileEntry(3, "ab" * 16)},
                        components={"model": "model.safetensors"}, checksum="xxh3")
    back = Manifest.from_bytes(manifest.to_bytes())
    assert back.files["model.safetensors"].parts == entry.parts
    assert back.files["model.safetensors"].part_size == PART
    assert back.files["small.json"].parts == ()
    assert "parts" not in back.raw["files"]["small.json"]
    report = RankFiles(dict(manifest.files), {}, "rng.safetensors")
    again = RankFiles.from_json(json.loads(json.dumps(report.to_json())))
    assert again.files["model.safetensors"].parts == entry.parts
    assert again.files["model.safetensors"].part_size == PART


@pytest.mark.parametrize("damage", ["count", "hex", "size", "tiny"])
def test_malformed_part_digests_make_the_manifest_corrupt(tmp_path, damage):
    _, _, entry = _written(tmp_path, 2 * PART + 5)
    parts = list(entry.parts)
    part_size = entry.part_size
    if damage == "count":
        parts = parts[:-1]
    elif damage == "hex":
        parts[1] = "zz" * 16
    elif damage == "size":
        part_size = 0
    else:  # consistent, but parts of 1 KiB: refused, a restore would hash a few bytes at a time
        part_size = 1024
        parts = ["ab" * 16] * -(-entry.size // part_size)
    bad = FileEntry(entry.size, entry.digest, tuple(parts), part_size)
    data = Manifest(step=1, files={"model.safetensors": bad}, components={}, checksum="xxh3").to_bytes()
    with pytest.raises(CorruptCheckpointError, match="invalid file entry"):
        Manifest.from_bytes(data)


def _steps_manifest(root):
    path = root / "step_00000001" / "manifest.json"
    return path, Manifest.from_bytes(path.read_bytes())


def test_a_restore_checks_the_parts_and_names_the_damaged_range(tmp_path):
    model = torch.nn.Linear(1024, 2048)  # 8 MiB of weights: three parts
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=model)
    _, manifest = _steps_manifest(tmp_path / "ckpt")
    name = manifest.file_for("model")
    assert len(manifest.files[name].parts) == 3
    weights = tmp_path / "ckpt" / "step_00000001" / name
    raw = bytearray(weights.read_bytes())
    raw[PART + 4096] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=f"has xxh3 [0-9a-f]+[.]+ in bytes {PART}-{2 * PART - 1} "):
        mgr.restore(1, model=torch.nn.Linear(1024, 2048))
    mgr.restore(1, model=torch.nn.Linear(1024, 2048), verify=False)  # unverified: loads, as asked


def test_a_step_whose_manifest_has_no_parts_is_verified_by_its_whole_file_digest(tmp_path):
    model = torch.nn.Linear(1024, 2048)
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=model)
    path, manifest = _steps_manifest(tmp_path / "ckpt")
    name = manifest.file_for("model")
    manifest.files = {n: FileEntry(e.size, e.digest) for n, e in manifest.files.items()}  # as earlier steps were
    manifest.raw = None
    path.write_bytes(manifest.to_bytes())
    fresh = torch.nn.Linear(1024, 2048)
    CheckpointManager(tmp_path / "ckpt").restore(1, model=fresh)
    assert torch.equal(fresh.weight, model.weight)
    weights = tmp_path / "ckpt" / "step_00000001" / name
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="has xxh3"):
        CheckpointManager(tmp_path / "ckpt").restore(1, model=fresh)


def test_verify_checks_the_whole_file_digest_and_names_the_damaged_part(tmp_path, capsys):
    from ckptmgr import cli
    from ckptmgr.format.manifest import verify_file
    from ckptmgr.io.local import LocalStore
    model = torch.nn.Linear(1024, 2048)
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(1, model=model)
    _, manifest = _steps_manifest(tmp_path / "ckpt")
    name = manifest.file_for("model")
    step = tmp_path / "ckpt" / "step_00000001"
    store = LocalStore(str(step))
    verify_file(store, name, manifest.files[name], "xxh3")  # intact: no error
    raw = bytearray((step / name).read_bytes())
    raw[2 * PART + 10] ^= 4
    (step / name).write_bytes(bytes(raw))
    where = f"bytes {2 * PART}-{manifest.files[name].size - 1}"
    with pytest.raises(ChecksumError, match=f"; {where} changed after the save"):
        verify_file(store, name, manifest.files[name], "xxh3")
    capsys.readouterr()
    assert cli.main(["verify", str(tmp_path / "ckpt")]) == 1
    assert f"({where} changed)" in capsys.readouterr().out
