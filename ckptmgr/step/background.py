"""One job at a time on a background thread, its error raised by the next call (as Lightning's async IO does).

An async save's write-and-commit, and the freeing of space of deleted steps,
run on a ``concurrent.futures`` executor with one worker: at most one job is
in flight, :meth:`Background.submit` waits for the previous one first
(back-pressure), and a job's exception is raised by the next ``submit``,
``wait`` or ``close``. The executor's worker is joined at interpreter exit,
so a job that is running when the program ends still finishes.

Background work yields to the thread that submitted it (the training loop):
the worker runs at a lower CPU priority (``nice`` +:data:`NICE`, Linux only;
its helper threads inherit it) and writes the files of a step on no more
threads than the cores training leaves free (:func:`ckptmgr.step.files.spare_cores`).
Where cores are idle it runs as fast as ever; where it would compete with
training, training wins and the save takes longer in the background.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from .files import spare_cores

logger = logging.getLogger(__name__)

__all__ = ["Background", "NICE"]

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
        #: What the running job is, for messages (``"saving step 7"``).
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
        self.what = what
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
        """Block until the running job is done; re-raise its error if it failed."""
        future, self._future = self._future, None
        if future is None:
            return
        try:
            future.result()
        except BaseException:
            raise
        finally:
            if not future.done():  # interrupted while waiting (Ctrl-C): keep it, the job still runs
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
