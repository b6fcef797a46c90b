"""Reading the pieces of one local file on several threads, handed on in file order.

A restore reads most of its bytes from one or two large files (the model
weights, the optimizer moments). Read by one thread, a file uses one core
while the other cores wait. :func:`read_pieces` reads it with positional
reads (``os.preadv``, which releases the interpreter lock) on a few threads
that take small neighbouring segments in turn, and :class:`InOrder` hands each
piece on (to a checksum, which must see the stream in order) as soon as every
piece before it has landed.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ..errors import CorruptCheckpointError

__all__ = ["SEGMENT", "InOrder", "fill_exact", "read_pieces", "usable_cpus"]

SEGMENT = 1024 * 1024  # what one thread reads before it takes the next segment: about 2 pieces, which stay in cache


def usable_cpus() -> int:
    """How many cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ends_early(name: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"the data of '{name}' ends early (truncated file)")


def fill_exact(fileobj: Any, view: memoryview, name: str) -> None:
    """Fill the byte view ``view`` from ``fileobj``'s position with ``readinto`` (or ``read`` where it has none).

    Raises:
        CorruptCheckpointError: the file ends first (``name`` labels the data).
    """
    readinto = getattr(fileobj, "readinto", None)
    got = 0
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:]) or 0
        else:
            chunk = fileobj.read(len(view) - got)
            n = len(chunk)
            view[got:got + n] = chunk
        if not n:
            raise _ends_early(name)
        got += n


class InOrder:
    """Hands pieces that land in any order, from any thread, to ``update`` in stream order.

    The thread that lands the piece ``update`` waits for hands it on, and then
    every piece after it that has landed too; other threads only mark theirs
    and go on reading. One thread at a time calls ``update`` (a checksum's),
    so the stream order holds without a lock around the hashing itself.
    ``meters`` are told the size of each piece handed on.
    """

    def __init__(self, update: Optional[Callable[[memoryview], None]], pieces: List[memoryview],
                 meters: Sequence[Callable[[int], None]] = ()) -> None:
        self._update = update
        self._meters = meters
        self._pieces = pieces
        self._landed = [False] * len(pieces)
        self._lock = threading.Lock()
        self._busy = False
        self._next = 0
        self.done = 0  # bytes of the stream handed on in order

    def landed(self, index: int) -> None:
        """Piece ``index`` is in place; hand on whatever is now next in order (unless another thread is at it)."""
        with self._lock:
            self._landed[index] = True
            if self._busy or index != self._next:
                return
            self._busy = True
        try:
            while True:
                with self._lock:
                    if self._next == len(self._pieces) or not self._landed[self._next]:
                        self._busy = False  # in the same hold as the check, so no landing goes unseen
                        return
                    piece = self._pieces[self._next]
                if self._update is not None:
                    self._update(piece)
                self.done += len(piece)
                for meter in self._meters:
                    meter(len(piece))
                with self._lock:
                    self._next += 1
        except BaseException:
            with self._lock:
                self._busy = False
            raise


def read_pieces(fd: int, start: int, pieces: Sequence[Tuple[str, memoryview]], landed: Callable[[int], None],
                 threads: int, segments: Optional[Sequence[Tuple[int, int]]] = None) -> None:
    """Read ``pieces`` (back to back from ``start``) with ``os.preadv`` on up to ``threads`` threads.

    The pieces are grouped into segments (``segments``: ``(first, end)``
    index ranges that cover the pieces in order; by default about
    :data:`SEGMENT` bytes each) that the threads take in turn, so they read
    neighbouring parts of the file at the same time and the slowest finishes
    at most one segment after the others. One thread reads all the pieces of
    a segment, in order. ``landed(i)`` is called, on that thread, as piece
    ``i`` is complete. Every thread has stopped when this returns or raises
    (after an error the threads take no more segments; of their errors, the
    one at the lowest offset is raised).
    """
    if segments is None:
        segments = []
        first = size = 0
        for i, (_, view) in enumerate(pieces):
            size += len(view)
            if size >= SEGMENT or i == len(pieces) - 1:
                segments.append((first, i + 1))
                first, size = i + 1, 0
    offsets = []
    at = start
    for _, view in pieces:
        offsets.append(at)
        at += len(view)
    lock = threading.Lock()
    taken = iter(segments)
    errors: List[Tuple[int, BaseException]] = []

    def work() -> None:
        while not errors:
            with lock:
                segment = next(taken, None)
            if segment is None:
                return
            i = segment[0]
            try:
                for i in range(*segment):
                    name, view = pieces[i]
                    got = 0
                    while got < len(view):
                        n = os.preadv(fd, [view[got:]], offsets[i] + got)
                        if not n:
                            raise _ends_early(name)
                        got += n
                    landed(i)
            except BaseException as exc:  # raised by the caller once every thread stopped
                errors.append((i, exc))
                return

    helpers = [threading.Thread(target=work, name="ckptmgr-read-part", daemon=True)
               for _ in range(min(threads, len(segments)) - 1)]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if errors:  # the error nearest the start of the file: where it ends early, say, not a later piece past that
        raise min(errors, key=lambda error: error[0])[1]
