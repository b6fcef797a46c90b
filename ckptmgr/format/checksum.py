"""Checksums of checkpoint files, computed on the bytes as they pass through a write or a read.

Every byte ckptmgr writes is hashed, and every byte it restores is verified,
so the checksum must cost next to nothing. Two algorithms are known, each
named in the manifest:

* ``"xxh3"`` (the default): XXH3-128 from the ``xxhash`` package, a
  non-cryptographic hash built for exactly this (torn writes, truncation,
  bit rot). It runs at about 25 GB/s on data already in the CPU cache, so
  it is computed *inline*: each piece is hashed right after it is read into
  its destination (or right before it is written), while it is still in
  cache, and the bytes are never fetched from memory twice.
* ``"sha256"``: what ckptmgr 0.1 wrote, kept as an option. At about
  1.2 GB/s it is slower than the I/O, so it runs on a helper thread that
  hashes piece *k* while the caller moves piece *k+1*.

Both ``hashlib`` and ``xxhash`` release the interpreter lock while they
hash a buffer, so hashing never holds the GIL in a Python loop; the loops
below run once per piece (a megabyte or more), not per small chunk.
:class:`HashingWriter` and :class:`HashingReader` hash what passes through
them, so verifying a file needs no second pass. A large xxh3 file also has
the digest of each :data:`PART` bytes recorded (:mod:`ckptmgr.format.parts`),
which lets a restore verify it on every core. Downloads and published
file names use sha256 directly (that is their published convention).
"""
from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from dataclasses import dataclass, field
from typing import IO, Any, Callable, List, Optional, Sequence, Tuple

from ..errors import CheckpointFormatError
from .parts import PartDigests
from .pieces import InOrder, fill_exact, read_pieces, usable_cpus

__all__ = ["CHECKSUMS", "DEFAULT_CHECKSUM", "PIECE", "CHUNK", "SPLIT_FROM", "PART", "FileEntry",
           "check_checksum", "hex_digits", "new_hash", "digest_of", "StreamDigest", "HashingWriter",
           "HashingReader", "METERS"]

#: Callbacks told how many bytes every HashingWriter/HashingReader moved (progress of a save or a
#: restore, see :mod:`ckptmgr.step.progress`); empty, it costs one truth test per piece.
METERS: List[Callable[[int], None]] = []

#: Algorithm name (as recorded in the manifest) -> hex digits of its digest.
_HEX_DIGITS = {"xxh3": 32, "sha256": 64}
CHECKSUMS = tuple(_HEX_DIGITS)
DEFAULT_CHECKSUM = "xxh3"
#: Algorithms fast enough to hash on the caller's thread while the piece is in cache.
_INLINE = frozenset({"xxh3"})

INLINE_PIECE = 512 * 1024     # inline hashing: a piece stays in the L2 cache between the copy and the hash
PIECE = 8 * 1024 * 1024       # threaded hashing: large pieces, so queue hand-offs are rare
CHUNK = 4 * 1024 * 1024       # reads when streaming a whole file
_THREADED_FROM = 1024 * 1024  # below this, feeding the helper thread costs more than it saves
SPLIT_FROM = 4 * 1024 * 1024  # a local read this large is spread over several threads (HashingReader.fill)
_MAX_READERS = 4
#: A file larger than this also gets the digest of each PART-byte part in the manifest (FileEntry.parts),
#: which a restore verifies part by part: a thread that reads a part hashes it while it is in its own cache.
PART = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    """Size and checksum (hex digest; its algorithm is the manifest's) of one file of a checkpoint.

    ``parts`` are the digests (same algorithm) of the file's consecutive
    ``part_size``-byte parts, the last one shorter; empty when not recorded
    (small files, sha256, checkpoints written before parts were). They are
    a second record of the same bytes, so two entries are equal when size and
    whole-file digest are.
    """

    size: int
    digest: str
    parts: Tuple[str, ...] = field(default=(), compare=False)
    part_size: int = field(default=0, compare=False)


def check_checksum(name: Any) -> str:
    """Validate a checksum name.

    Returns:
        ``name``.

    Raises:
        ValueError: not one of :data:`CHECKSUMS`.
    """
    if not isinstance(name, str) or name not in _HEX_DIGITS:
        raise ValueError(f"checksum must be one of {', '.join(repr(c) for c in CHECKSUMS)}, got {name!r}")
    return name


def hex_digits(name: str) -> int:
    """Length of a hex digest of algorithm ``name``."""
    return _HEX_DIGITS[name]


def new_hash(name: str) -> Any:
    """A fresh hash object (``update``/``hexdigest``) of algorithm ``name``.

    Raises:
        ValueError: an unknown name.
        CheckpointFormatError: ``xxh3`` without the ``xxhash`` package installed.
    """
    if check_checksum(name) == "sha256":
        return hashlib.sha256()
    try:
        import xxhash
    except ImportError as exc:  # a dependency of ckptmgr; only a broken environment lacks it
        raise CheckpointFormatError("the xxh3 checksum needs the xxhash package, which is not installed",
                                    "pip install xxhash") from exc
    return xxhash.xxh3_128()


def digest_of(data: Any, name: str) -> str:
    """Hex digest of a bytes-like object with algorithm ``name``."""
    h = new_hash(name)
    h.update(data)
    return str(h.hexdigest())


class StreamDigest:
    """The ordered digest of a stream of buffers, fed as they are written or read.

    Fast algorithms hash each buffer at once, on the caller's thread (the
    interpreter lock is released inside). Slow ones hash buffers of
    :data:`_THREADED_FROM` bytes or more on a helper thread, in order; the
    caller must then not modify a buffer after :meth:`update` until
    :meth:`hexdigest` returned (a checkpoint's tensors are staged or not
    touched while they are saved, and read targets are handed out only after
    verification), which makes the overlap safe without a copy.

    Args:
        name: The algorithm (one of :data:`CHECKSUMS`).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._hash = new_hash(name)
        self.inline = name in _INLINE
        #: How many bytes a caller should move per call, so hashing and I/O interleave well.
        self.piece = INLINE_PIECE if self.inline else PIECE
        self._queue: Optional["queue.Queue[Any]"] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _work(self) -> None:
        while True:
            item = self._queue.get()  # type: ignore[union-attr]
            if item is None:
                return
            try:
                self._hash.update(item)
            except BaseException as exc:  # reported by hexdigest()
                self._error = exc

    def update(self, data: Any) -> None:
        """Add bytes, in stream order."""
        if self._thread is None:
            if self.inline or len(data) < _THREADED_FROM:
                self._hash.update(data)
                return
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, name=f"ckptmgr-{self.name}", daemon=True)
            self._thread.start()
        self._queue.put(data)  # type: ignore[union-attr]

    def hexdigest(self) -> str:
        """Wait for pending buffers and return the hex digest.

        Raises:
            BaseException: whatever hashing raised in the helper thread.
        """
        if self._thread is not None:
            self._queue.put(None)  # type: ignore[union-attr]
            self._thread.join()
            self._thread = None
            self._queue = None
        if self._error is not None:
            raise self._error
        return str(self._hash.hexdigest())


class HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them on the way out.

    Args:
        fileobj: The file to write through to.
        checksum: The algorithm (one of :data:`CHECKSUMS`).
        parts: Also record the digest of every :data:`PART` bytes (:attr:`FileEntry.parts`) when the file
            is larger than one part; only for inline algorithms (xxh3), whose second hash of a piece
            still in cache costs little.
    """

    def __init__(self, fileobj: IO[bytes], checksum: str, parts: bool = False) -> None:
        self._fh = fileobj
        self._digest = StreamDigest(checksum)
        self._parts = PartDigests(lambda: new_hash(checksum), PART) if parts and self._digest.inline else None
        self.size = 0

    def write(self, data: Any) -> int:
        """Write ``data`` (bytes-like) through to the wrapped file, piece by piece, each hashed beside its write."""
        view = memoryview(data).cast("B")
        step = self._digest.piece
        for start in range(0, len(view), step):
            piece = view[start:start + step]
            self._digest.update(piece)  # inline: pulls the piece into cache, and the write copies it from there
            if self._parts is not None:
                self._parts.feed(self.size + start, piece)
            self._fh.write(piece)
            for meter in METERS:
                meter(len(piece))
        self.size += len(view)
        return len(view)

    def entry(self) -> FileEntry:
        """The size and digest of everything written so far (call once, after the last write)."""
        if self._parts is not None and self.size > self._parts.size:
            return FileEntry(self.size, self._digest.hexdigest(), self._parts.digests(self.size), self._parts.size)
        return FileEntry(self.size, self._digest.hexdigest())


class HashingReader:
    """A read-only file wrapper that counts (and, given a checksum, hashes) every byte read.

    It lets a loader verify a file in the same pass that parses it. Given
    the ``expected`` entry of an inline checksum (xxh3) with part digests,
    it hashes part by part instead of the whole stream, and :meth:`finish`
    returns the parts' digests (its ``digest`` is then empty): a large read
    is then spread over threads that each hash the parts they read, while
    those are still in their own cache (see :meth:`fill`).

    Args:
        fileobj: The file to read from.
        checksum: The algorithm (one of :data:`CHECKSUMS`), or None to only count bytes.
        expected: The manifest's entry for the file, when it is known.
    """

    def __init__(self, fileobj: IO[bytes], checksum: Optional[str], expected: Optional[FileEntry] = None) -> None:
        self._fh = fileobj
        self._parts: Optional[PartDigests] = None
        self._digest: Optional[StreamDigest] = None
        if checksum is not None and checksum in _INLINE and expected is not None and expected.parts:
            self._parts = PartDigests(lambda: new_hash(checksum), expected.part_size)
        elif checksum is not None:
            self._digest = StreamDigest(checksum)
        self._hashing = checksum is not None
        self._broken = False  # part digests that no longer describe the file in order (after a failed fill)
        self.size = 0

    def _seen(self, data: Any) -> None:
        if self._digest is not None:
            self._digest.update(data)
        elif self._parts is not None:
            self._parts.feed(self.size, data)
        self.size += len(data)
        for meter in METERS:
            meter(len(data))

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all when negative)."""
        data = self._fh.read(n)
        self._seen(data)
        return data

    def readinto(self, buf: Any) -> int:
        """Read into a writable buffer, at most one piece at a time, hashing each piece as it lands."""
        view = memoryview(buf).cast("B")
        if self._hashing:
            view = view[:self._digest.piece if self._digest is not None else INLINE_PIECE]
        if hasattr(self._fh, "readinto"):
            n = self._fh.readinto(view) or 0
        else:
            data = self._fh.read(len(view))
            n = len(data)
            view[:n] = data
        self._seen(view[:n])
        return n

    def fill(self, targets: Sequence[Tuple[str, memoryview]]) -> None:
        """Fill byte views that lie back to back in the file from the current position, in that order.

        ``targets`` are ``(name, view)`` pairs; the name only labels errors. A
        local file and at least :data:`SPLIT_FROM` bytes are read on several
        threads (positional reads of interleaved segments, so one large file
        uses every core). A whole-file digest still sees the pieces in stream
        order, each hashed as soon as every piece before it has landed, by
        whichever thread lands it; part digests are fed by the thread that
        reads the part, which takes the whole part. The file position ends
        after the last byte filled.

        Raises:
            CorruptCheckpointError: the file ends before the last view is full.
        """
        total = sum(len(view) for _, view in targets)
        fd = self._positional_fd() if total >= SPLIT_FROM else None
        if fd is None:
            for name, view in targets:
                fill_exact(self, view, name)
            return
        start = self._fh.tell()
        if self._parts is not None:
            pieces, segments, hashes = self._parts.cut(self.size, targets, INLINE_PIECE)
        else:
            piece = self._digest.piece if self._digest is not None else INLINE_PIECE
            pieces = [(name, view[at:at + piece]) for name, view in targets for at in range(0, len(view), piece)]
            segments = None
        views = [view for _, view in pieces]
        order = InOrder(None if self._digest is None else self._digest.update, views, METERS)
        landed: Callable[[int], None] = order.landed
        if self._parts is not None:
            def by_part(i: int) -> None:  # the part's own hash, on the thread that reads the whole part
                hashes[i].update(views[i])
                order.landed(i)
            landed = by_part
        try:
            read_pieces(fd, start, pieces, landed, min(_MAX_READERS, usable_cpus()), segments)
        except BaseException:
            self._broken = self._parts is not None  # parts past the first gap may hold bytes out of order
            raise
        finally:  # on an error, the file goes on from the first piece not landed: finish() reads the rest in order
            self.size += order.done
            self._fh.seek(start + order.done)

    def _positional_fd(self) -> Optional[int]:
        """The descriptor of a local regular file that ``os.preadv`` may read at any offset, or None."""
        if not hasattr(os, "preadv"):
            return None
        try:
            fd = self._fh.fileno()
            return fd if stat.S_ISREG(os.fstat(fd).st_mode) and self._fh.seekable() else None
        except (AttributeError, OSError, ValueError):
            return None

    def finish(self) -> FileEntry:
        """Read whatever is left and return the size and digest (empty without a checksum) of the stream.

        With part digests, the entry holds them and an empty ``digest``; after
        a failed :meth:`fill` it holds neither, so it matches no manifest entry.
        """
        inline = self._parts is not None or (self._digest is not None and self._digest.inline)
        if inline and hasattr(self._fh, "readinto"):
            buf = bytearray(INLINE_PIECE)  # reused: the whole rest of the file passes through the cache
            while self.readinto(buf):
                pass
        else:
            while self.read(CHUNK):
                pass
        if self._parts is not None:
            if self._broken:
                return FileEntry(self.size, "")
            return FileEntry(self.size, "", self._parts.digests(self.size), self._parts.size)
        return FileEntry(self.size, self._digest.hexdigest() if self._digest is not None else "")
