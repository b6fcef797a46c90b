"""Reading one large local file on several threads (HashingReader.fill), hashed in stream order all the same."""
import io
import random
import threading

import pytest

from ckptmgr.errors import CorruptCheckpointError
from ckptmgr.format import checksum
from ckptmgr.format.checksum import SPLIT_FROM, FileEntry, HashingReader, StreamDigest, digest_of
from ckptmgr.format.pieces import InOrder

HEAD = 1000  # bytes read before the filled views, as a safetensors header is


def _file(tmp_path, size, name="data.bin"):
    rng = random.Random(size)
    data = rng.randbytes(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def _views(total, cuts):
    """Byte views (and their backing buffers) of the given sizes, back to back, adding up to ``total``."""
    sizes = cuts + [total - sum(cuts)]
    bufs = [bytearray(n) for n in sizes]
    return bufs, [(f"t{i}", memoryview(b)) for i, b in enumerate(bufs)]


@pytest.mark.parametrize("name", ["xxh3", "sha256", None])
def test_a_large_local_file_fills_on_several_threads_and_hashes_like_one_pass(tmp_path, name, monkeypatch):
    threads = []
    real = checksum.read_pieces

    def spy(fd, start, pieces, landed, n, segments=None):
        threads.append(n)
        return real(fd, start, pieces, landed, max(n, 3), segments)  # at least 3 readers, even on a 1-core runner
    monkeypatch.setattr(checksum, "read_pieces", spy)
    size = HEAD + 2 * SPLIT_FROM + 12345 + 77
    path, data = _file(tmp_path, size)
    bufs, views = _views(size - HEAD - 77, [5, SPLIT_FROM + 3, 700_001])
    with open(path, "rb") as fh:
        reader = HashingReader(fh, name)
        assert reader.read(HEAD) == data[:HEAD]
        reader.fill(views)
        assert threads, "the large read was not split"
        assert b"".join(bufs) == data[HEAD:size - 77]
        entry = reader.finish()  # the 77 bytes after the views are read in order after them
    assert entry == FileEntry(size, "" if name is None else digest_of(data, name))


def test_small_reads_and_files_without_a_descriptor_are_read_in_one_pass(tmp_path, monkeypatch):
    def refuse(*args):
        raise AssertionError("split a read it should not have")
    monkeypatch.setattr(checksum, "read_pieces", refuse)
    path, data = _file(tmp_path, SPLIT_FROM - 1 + HEAD)
    bufs, views = _views(SPLIT_FROM - 1, [10])
    with open(path, "rb") as fh:
        reader = HashingReader(fh, "xxh3")
        reader.read(HEAD)
        reader.fill(views)
        assert reader.finish() == FileEntry(len(data), digest_of(data, "xxh3"))
    big = bytes(range(256)) * (SPLIT_FROM // 256 + 1)
    bufs, views = _views(len(big), [1])
    reader = HashingReader(io.BytesIO(big), "xxh3")  # no file descriptor: read in order
    reader.fill(views)
    assert b"".join(bufs) == big and reader.finish() == FileEntry(len(big), digest_of(big, "xxh3"))


@pytest.mark.parametrize("unit", [SPLIT_FROM, 4096])  # a split read, and one in a single pass
def test_a_file_that_ends_early_is_reported_and_the_digest_covers_exactly_what_is_there(tmp_path, unit):
    size = HEAD + 3 * unit
    path, data = _file(tmp_path, size)
    cut = HEAD + unit + 1234  # the file is truncated here, inside t1, while the views promise more
    with open(path, "r+b") as fh:
        fh.truncate(cut)
    bufs, views = _views(size - HEAD, [unit, 2000])
    with open(path, "rb") as fh:
        reader = HashingReader(fh, "xxh3")
        reader.read(HEAD)
        with pytest.raises(CorruptCheckpointError, match="'t1' ends early"):
            reader.fill(views)
        # a piece that landed after a gap is not counted: finish() goes on from the first gap, in order
        assert reader.finish() == FileEntry(cut, digest_of(data[:cut], "xxh3"))


@pytest.mark.parametrize("name", ["xxh3", "sha256"])
def test_pieces_landing_in_any_order_from_many_threads_are_hashed_in_stream_order(name):
    rng = random.Random(7)
    pieces = [memoryview(rng.randbytes(rng.randint(1, 3000))) for _ in range(400)]
    digest = StreamDigest(name)
    order = InOrder(digest.update, pieces)
    shuffled = list(range(len(pieces)))
    rng.shuffle(shuffled)
    parts = [shuffled[k::4] for k in range(4)]
    threads = [threading.Thread(target=lambda part=part: [order.landed(i) for i in part]) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    whole = b"".join(bytes(p) for p in pieces)
    assert order.done == len(whole)
    assert digest.hexdigest() == digest_of(whole, name)


def test_a_gap_holds_back_every_later_piece():
    pieces = [memoryview(b"a"), memoryview(b"bb"), memoryview(b"ccc")]
    order = InOrder(None, pieces)
    order.landed(2)
    order.landed(0)
    assert order.done == 1  # piece 1 is missing: piece 2 waits
    order.landed(1)
    assert order.done == 6


def test_a_read_fills_each_byte_of_memory_once_so_aliased_targets_get_a_copy():
    import torch

    from ckptmgr.format.safetensors import _Spans
    base = torch.zeros(100)
    spans = _Spans()
    assert spans.claim(base[10:20]) and spans.claim(base[30:40]) and spans.claim(base[20:30])
    assert not spans.claim(base[10:20]) and not spans.claim(base[15:16]) and not spans.claim(base[39:45])
    assert not spans.claim(base[0:11]) and spans.claim(base[0:10]) and spans.claim(base[40:100])
    assert spans.claim(torch.zeros(0)) and spans.claim(torch.zeros(3))


@pytest.mark.parametrize("group", [1, 3 * 1024 * 1024, 1 << 40])
def test_tensors_are_read_group_by_group_with_one_checksum_over_the_file(tmp_path, monkeypatch, group):
    import torch

    from ckptmgr.format import safetensors
    from ckptmgr.format.checksum import HashingWriter
    monkeypatch.setattr(safetensors, "READ_GROUP", group)
    moved = []  # bytes of the file read when each tensor was moved to map_location
    real_map = safetensors.map_tensor
    monkeypatch.setattr(safetensors, "map_tensor", lambda t, loc: (moved.append(reader.size), real_map(t, loc))[1])
    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate([10, 2_000_000, 5, 1_500_000, 700_000])}
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as fh:
        writer = HashingWriter(fh, "xxh3")
        safetensors.write_safetensors(writer, tensors)
        written = writer.entry()
    with open(path, "rb") as fh:
        reader = HashingReader(fh, "xxh3")
        got, _ = safetensors.read_safetensors(reader, size=written.size)
        assert reader.finish() == written
    assert list(got) == list(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    assert len(moved) == len(tensors)
    # small groups: the first tensors are moved before the last are read (a GPU restore's host memory stays bounded)
    assert (moved[0] < written.size) == (group < 1 << 40)
