"""Feedback on long work: size and throughput of a save or restore in the log, and a progress bar on a terminal.

A 20 GB restore that prints nothing for two minutes looks hung. Every byte a
save writes or a restore reads passes through the hashing wrappers of
:mod:`ckptmgr.format.checksum`, which report to :data:`~ckptmgr.format.checksum.METERS`;
:func:`measure` counts them for one save or restore, and on rank 0 with a
terminal on stderr shows a tqdm bar (as downloads do) once the work has run
longer than :data:`BAR_DELAY` seconds, so quick saves stay silent.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Iterator, Optional

from ..format.checksum import METERS

__all__ = ["BAR_DELAY", "Measured", "measure", "rate"]

#: Seconds of work before a progress bar appears.
BAR_DELAY = 2.0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def rate(nbytes: int, seconds: float) -> str:
    """``'1.2 GiB in 3.4 s (361.2 MiB/s)'``."""
    return f"{_size(nbytes)} in {seconds:.1f} s ({_size(nbytes / max(seconds, 1e-6))}/s)"


class Measured:
    """Bytes moved and time spent by one :func:`measure` block (``nbytes`` grows while it runs)."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self.bar: Any = None

    def add(self, n: int) -> None:
        """Count ``n`` more bytes (called from the I/O threads)."""
        with self._lock:
            self.nbytes += n
        if self.bar is not None:
            self.bar.update(n)

    @property
    def seconds(self) -> float:
        """Time since the block started."""
        return time.monotonic() - self.start

    def summary(self, nbytes: Optional[int] = None) -> str:
        """Size and throughput so far (``nbytes`` instead of the count, when the caller knows better)."""
        return rate(self.nbytes if nbytes is None else nbytes, self.seconds)


@contextlib.contextmanager
def measure(what: str, total: Optional[int] = None, bar: bool = False, stream: Any = None) -> Iterator[Measured]:
    """Count the bytes ckptmgr's hashing wrappers move inside the block; optionally show a progress bar.

    Args:
        what: Label of the bar (``'saving step 7'``).
        total: Bytes expected, for the bar's percentage (None: unknown).
        bar: Show a bar when ``stream`` is a terminal (pass True on rank 0 of a sync save or a restore).
        stream: Where the bar goes (default ``sys.stderr``).
    """
    measured = Measured()
    out = sys.stderr if stream is None else stream
    if bar and getattr(out, "isatty", lambda: False)():
        try:
            from tqdm import tqdm
            measured.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, file=out,
                                delay=BAR_DELAY, leave=False)
        except ImportError:  # pragma: no cover - tqdm is a dependency; a bar is only a nicety
            measured.bar = None
    METERS.append(measured.add)
    try:
        yield measured
    finally:
        METERS.remove(measured.add)
        if measured.bar is not None:
            measured.bar.close()
