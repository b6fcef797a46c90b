"""sha256 computed beside the I/O instead of after it.

Every byte ckptmgr writes or verifies is hashed. Done inline, hashing adds
its full cost to each save and load; hashlib releases the interpreter lock on
large buffers, so a helper thread can hash chunk *k* while the caller writes
or reads chunk *k+1*, and a save then costs about as much as the write alone.
Chunks are hashed strictly in the order they were fed.
"""
from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any, Optional

__all__ = ["Sha256Pipeline", "PIECE"]

PIECE = 8 * 1024 * 1024       # how large writes are split, so hashing and I/O overlap within a tensor
_THREADED_FROM = 1024 * 1024  # below this, feeding the thread costs more than it saves


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
