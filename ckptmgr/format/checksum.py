"""Checksums computed beside the I/O instead of after it, and file wrappers that hash what passes through.

Every byte ckptmgr writes or verifies is hashed. Done inline, hashing adds
its full cost to each save and load; hashlib releases the interpreter lock on
large buffers, so a helper thread can hash chunk *k* while the caller writes
or reads chunk *k+1*, and a save then costs about as much as the write alone.
Chunks are hashed strictly in the order they were fed. A file is written or
read once: :class:`HashingWriter` and :class:`HashingReader` hash the bytes
that pass through them, so verifying needs no second pass.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import IO, Any, Callable, List, Optional

__all__ = ["PIECE", "CHUNK", "FileEntry", "Sha256Pipeline", "HashingWriter", "HashingReader", "METERS"]

#: Callbacks told how many bytes every HashingWriter/HashingReader moved (progress of a save or a
#: restore, see :mod:`ckptmgr.step.progress`); empty, it costs one truth test per piece.
METERS: List[Callable[[int], None]] = []

PIECE = 8 * 1024 * 1024       # how large writes are split, so hashing and I/O overlap within a tensor
CHUNK = 4 * 1024 * 1024       # reads when streaming a whole file
_THREADED_FROM = 1024 * 1024  # below this, feeding the thread costs more than it saves


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file of a checkpoint."""

    size: int
    sha256: str


class Sha256Pipeline:
    """An ordered sha256 that hashes large buffers on a helper thread.

    The caller must not modify a buffer after :meth:`update` until
    :meth:`hexdigest` returned (a checkpoint's tensors are staged or not
    touched while they are saved, and read targets are handed out only after
    verification), which is what makes the overlap safe without a copy.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._queue: Optional["queue.Queue[Any]"] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _work(self) -> None:
        while True:
            item = self._queue.get()  # type: ignore[union-attr]
            if item is None:
                return
            try:
                self._sha.update(item)
            except BaseException as exc:  # reported by hexdigest()
                self._error = exc

    def update(self, data: Any) -> None:
        """Add bytes; large ones are hashed in the background, in order."""
        if self._thread is None:
            if len(data) < _THREADED_FROM:
                self._sha.update(data)
                return
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, name="ckptmgr-sha256", daemon=True)
            self._thread.start()
        self._queue.put(data)  # type: ignore[union-attr]

    def hexdigest(self) -> str:
        """Wait for pending chunks and return the hex digest.

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
        return self._sha.hexdigest()




class HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them on the way out."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._fh = fileobj
        self._sha = Sha256Pipeline()
        self.size = 0

    def write(self, data: Any) -> int:
        """Write ``data`` (bytes-like) through to the wrapped file, hashing it beside the write."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), PIECE):
            piece = view[start:start + PIECE]
            self._sha.update(piece)
            self._fh.write(piece)
            for meter in METERS:
                meter(len(piece))
        self.size += len(view)
        return len(view)

    def entry(self) -> FileEntry:
        """The size and sha256 of everything written so far (call once, after the last write)."""
        return FileEntry(self.size, self._sha.hexdigest())


class HashingReader:
    """A read-only file wrapper that counts (and, with ``digest``, hashes) every byte read.

    It lets a loader verify a file in the same pass that parses it.
    """

    def __init__(self, fileobj: IO[bytes], digest: bool = True) -> None:
        self._fh = fileobj
        self._sha = Sha256Pipeline() if digest else None
        self.size = 0

    def _seen(self, data: Any) -> None:
        if self._sha is not None:
            self._sha.update(data)
        self.size += len(data)
        for meter in METERS:
            meter(len(data))

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all when negative)."""
        data = self._fh.read(n)
        self._seen(data)
        return data

    def readinto(self, buf: Any) -> int:
        """Read into a writable buffer (at most one piece at a time, so hashing overlaps the next read)."""
        view = memoryview(buf).cast("B")
        if self._sha is not None:
            view = view[:PIECE]
        if hasattr(self._fh, "readinto"):
            n = self._fh.readinto(view) or 0
        else:
            data = self._fh.read(len(view))
            n = len(data)
            view[:n] = data
        self._seen(view[:n])
        return n

    def finish(self) -> FileEntry:
        """Read whatever is left and return the size and sha256 (empty without ``digest``) of the stream."""
        while self.read(CHUNK):
            pass
        return FileEntry(self.size, self._sha.hexdigest() if self._sha is not None else "")
