"""One job at a time on a background thread, its error raised by the next call (as Lightning's async IO does).

An async save's write-and-commit, and the freeing of space of deleted steps,
run on a ``concurrent.futures`` executor with one worker: at most one job is
in flight, :meth:`Background.submit` waits for the previous one first
(back-pressure), and a job's exception is raised by the next ``submit``,
``wait`` or ``close``.

A job that is running when the program stops always finishes, whichever way
the program stops:

* Ctrl-C while the main thread waits for it (``wait``, a back-pressured
  ``save``, ``close``): :func:`finish_before_interrupt` defers the
  KeyboardInterrupt, logs "finishing checkpoint step N before exit", and
  raises it once the job is done.
* The main thread returns (or raises) with the job still running: at
  interpreter shutdown the executor module stops accepting work *before* it
  joins its workers, so a job that still had files to hand to a thread pool
  would fail half-way. A hook registered with :mod:`threading`'s shutdown
  sequence (it runs before the executor's own) waits for every running job
  first, and logs the same line.

Background work yields to the thread that submitted it (the training loop):
the worker runs at a lower CPU priority (``nice`` +:data:`NICE`, Linux only;
its helper threads inherit it) and writes the files of a step on no more
threads than the cores training leaves free (:func:`ckptmgr.step.files.spare_cores`).
Where cores are idle it runs as fast as ever; where it would compete with
training, training wins and the save takes longer in the background.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, List, Optional

from .files import spare_cores

logger = logging.getLogger(__name__)

__all__ = ["Background", "finish_before_interrupt", "NICE"]


@contextlib.contextmanager
def finish_before_interrupt(what: str) -> Iterator[None]:
    """Let the block run to its end even if Ctrl-C arrives; then raise the KeyboardInterrupt.

    Only the main thread receives KeyboardInterrupt, and only while Python's
    default SIGINT handler is installed; otherwise (another thread, a handler
    of the application's own, or a block nested in another such block) the
    block runs unchanged. Each Ctrl-C is logged; a process that must stop at
    once can still be killed (the next save removes what a killed save left).

    Args:
        what: What is being finished, for the log line (``"checkpoint step 7"``).

    Raises:
        KeyboardInterrupt: after the block ended normally, when Ctrl-C arrived during it.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: List[int] = []

    def deferred(signum: int, frame: Any) -> None:
        if received:
            logger.warning("still finishing %s; kill the process to abandon it (the next save cleans up)", what)
        else:
            logger.warning("Ctrl-C: finishing %s before exit", what)
        received.append(signum)

    signal.signal(signal.SIGINT, deferred)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


# Every Background with a job possibly in flight; the shutdown hook waits for them.
_LIVE: "weakref.WeakSet[Background]" = weakref.WeakSet()
_HOOKED = False
_HOOK_LOCK = threading.Lock()


def _finish_at_exit() -> None:
    for background in list(_LIVE):
        if background.busy:
            logger.warning("finishing %s before exit", background.what)
            try:
                background.wait()
            except BaseException as exc:  # reported; the process is ending anyway
                logger.error("%s did not finish: %s", background.what, exc)


def _hook_shutdown() -> None:
    """Run :func:`_finish_at_exit` in threading's shutdown, before the executor module refuses new work."""
    global _HOOKED
    with _HOOK_LOCK:
        if _HOOKED:
            return
        register = getattr(threading, "_register_atexit", None)  # Python >= 3.9; the hooks run last-in first-out
        if register is not None:
            register(_finish_at_exit)
        _HOOKED = True


NICE = 5  # how much lower the worker's CPU priority is than the caller's (0 disables)


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority by :data:`NICE` (Linux: nice is per thread); best effort."""
    if not NICE or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
    except OSError as exc:  # a sandbox may forbid it; the work still runs
        logger.debug("could not lower the background worker's priority: %s", exc)


class Background:
    """A one-worker executor with back-pressure and deferred errors.

    Args:
        name: Thread name prefix (shows up in stack dumps).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: Optional[ThreadPoolExecutor] = None
        self._future: Optional["Future[Any]"] = None
        #: What the running job is, for messages (``"checkpoint step 7"``).
        self.what = ""

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self._future is not None and not self._future.done()

    def submit(self, job: Callable[[], Any], what: str = "") -> None:
        """Wait for the running job, re-raise its error if any, then start ``job``.

        Raises:
            BaseException: whatever the previous job raised.
        """
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name, initializer=_lower_priority)
            _hook_shutdown()  # after the executor module registered its own hook, so ours runs first
            _LIVE.add(self)
        self.what = what or "background checkpoint work"
        self._future = self._pool.submit(self._run, job)

    @staticmethod
    def _run(job: Callable[[], Any]) -> Any:
        try:
            with spare_cores():
                return job()
        except BaseException as exc:  # kept in the future for the caller's next submit/wait/close
            logger.error("background checkpoint work failed: %s", exc)
            raise

    def wait(self) -> None:
        """Block until the running job is done; re-raise its error if it failed.

        Ctrl-C while waiting lets the job finish first (see :func:`finish_before_interrupt`).
        """
        future, self._future = self._future, None
        if future is None:
            return
        try:
            if future.done():
                future.result()
                return
            with finish_before_interrupt(self.what):
                future.result()
        finally:
            if not future.done():  # interrupted by a handler of the application's own: the job still runs
                self._future = future

    def close(self) -> None:
        """Wait for the running job, then stop the worker thread.

        Raises:
            BaseException: whatever the last job raised (the worker is stopped all the same).
        """
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            _LIVE.discard(self)
