"""One job at a time on a background thread, its error raised by the next call (as Lightning's async IO does).

An async save's write-and-commit, and the freeing of space of deleted steps,
run on a ``concurrent.futures`` executor with one worker: at most one job is
in flight, :meth:`Background.submit` waits for the previous one first
(back-pressure), and a job's exception is raised by the next ``submit``,
``wait`` or ``close``. The executor's worker is joined at interpreter exit,
so a job that is running when the program ends still finishes.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

__all__ = ["Background"]


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
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self.what = what
        self._future = self._pool.submit(self._run, job)

    @staticmethod
    def _run(job: Callable[[], Any]) -> Any:
        try:
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
