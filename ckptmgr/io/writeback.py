"""Local files that start going to disk while they are still being written.

A durable save ends with ``fsync``. Left alone, Linux writes a file's dirty
pages back only once its thresholds are crossed, so most of the disk work
waits for that final ``fsync``, after every byte was copied: copying and
writing to disk run one after the other. ``sync_file_range(...,
SYNC_FILE_RANGE_WRITE)`` asks the kernel to start writing a range now,
without waiting for it, so the disk writes one piece while the caller copies
the next and the final ``fsync`` finds little left to do. Measured on this
project's 2-core VM (virtio disk, 128 MiB, write + fsync): 0.93 GB/s plain,
1.3-1.5 GB/s with writeback started every 4-32 MiB. Python has no binding
for the call, so it goes through ctypes; where it is missing (not Linux) the
file is a plain one. Durability still comes from the ``fsync`` alone: this is
only a hint.
"""
from __future__ import annotations

import ctypes
import io
import os
from typing import Any, Callable, Optional

__all__ = ["WRITEBACK_EVERY", "WritebackFile", "open_writeback"]

WRITEBACK_EVERY = 8 * 1024 * 1024  # start writeback of what was written each time this much more is dirty
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages in the range, do not wait


def _load() -> Optional[Callable[..., int]]:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_sync_file_range = _load()


class WritebackFile(io.FileIO):
    """A raw file (``io.FileIO``) that asks the kernel to write back every :data:`WRITEBACK_EVERY` bytes written.

    Writes are assumed sequential from where the file was opened (a seek only
    makes the hint less precise). ctypes calls release the interpreter lock.
    """

    def __init__(self, fd: int, mode: str = "wb", closefd: bool = True) -> None:
        super().__init__(fd, mode, closefd=closefd)
        self._written = 0
        self._started = 0

    def write(self, data: Any) -> int:
        n = super().write(data) or 0
        self._written += n
        if _sync_file_range is not None and self._written - self._started >= WRITEBACK_EVERY:
            _sync_file_range(self.fileno(), self._started, self._written - self._started, _SYNC_FILE_RANGE_WRITE)
            self._started = self._written
        return n


def open_writeback(fd: int) -> io.BufferedWriter:
    """A buffered binary writer over ``fd`` (closed with it) whose bytes start going to disk as they are written."""
    if _sync_file_range is None or os.environ.get("CKPTMGR_NO_WRITEBACK"):
        return io.BufferedWriter(io.FileIO(fd, "wb", closefd=True))
    return io.BufferedWriter(WritebackFile(fd))
