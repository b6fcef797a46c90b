"""Part digests: the checksum of each fixed-size part of a file, beside the whole file's.

A whole-file checksum (XXH3-128 of the stream) can only be computed in
order, by one thread at a time. A restore reads a large file on every core,
so with only that checksum the thread whose turn it is to hash often hashes
a piece another core just read, fetched back from a shared cache. The
manifest therefore also records the digest (same algorithm) of every part
of :data:`~ckptmgr.format.checksum.PART` bytes of a large file; a restore
hands each part to one thread, which hashes every piece of it right after
reading it. Both records come from the same bytes as they are written.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

__all__ = ["PartDigests"]


class PartDigests:
    """The digests of the consecutive ``size``-byte parts of a stream (the last one shorter), fed at any offset.

    Each part has its own hash object, so different threads may feed
    different parts at once; the bytes of one part must come in order.

    Args:
        new: Makes a fresh hash object (``update``/``hexdigest``).
        size: Bytes per part.
    """

    def __init__(self, new: Callable[[], Any], size: int) -> None:
        self._new = new
        self.size = size
        self._hashes: Dict[int, Any] = {}

    def hash_of(self, index: int) -> Any:
        """The hash object of part ``index`` (created on first use, so create them before threads share this)."""
        h = self._hashes.get(index)
        if h is None:
            h = self._hashes[index] = self._new()
        return h

    def feed(self, offset: int, data: Any) -> None:
        """Hash ``data``, which starts ``offset`` bytes into the stream, into the parts it covers."""
        view = memoryview(data).cast("B")
        at = 0
        while at < len(view):
            index, within = divmod(offset + at, self.size)
            n = min(len(view) - at, self.size - within)
            self.hash_of(index).update(view[at:at + n])
            at += n

    def digests(self, total: int) -> Tuple[str, ...]:
        """The hex digests of the parts of a ``total``-byte stream, in order."""
        return tuple(str(self.hash_of(i).hexdigest()) for i in range(-(-total // self.size)))

    def cut(self, offset: int, targets: Sequence[Tuple[str, memoryview]], piece: int) -> Tuple[
            List[Tuple[str, memoryview]], List[Tuple[int, int]], List[Any]]:
        """Cut byte views that lie back to back from ``offset`` into pieces for a threaded read.

        Returns:
            ``(pieces, segments, hashes)``: ``(name, view)`` pieces of at most
            ``piece`` bytes that never cross a part boundary; the ``(first,
            end)`` index range of the pieces of each part (one thread reads one
            range); and the hash object each piece goes to.
        """
        pieces: List[Tuple[str, memoryview]] = []
        hashes: List[Any] = []
        segments: List[Tuple[int, int]] = []
        for name, view in targets:
            at = 0
            while at < len(view):
                index, within = divmod(offset, self.size)
                n = min(piece, self.size - within, len(view) - at)
                h = self.hash_of(index)
                if not hashes or hashes[-1] is not h:
                    segments.append((len(pieces), len(pieces)))
                pieces.append((name, view[at:at + n]))
                hashes.append(h)
                segments[-1] = (segments[-1][0], len(pieces))
                at += n
                offset += n
        return pieces, segments, hashes
