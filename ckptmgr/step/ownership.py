"""One writer per manager directory: detect a second job saving into the same place.

Two jobs started by mistake on one directory would delete each other's
in-flight saves (leftover cleaning) and committed steps (retention). A manager
therefore claims the directory at its first save, and only then: listing,
restoring and the read-only CLI commands never claim anything.

* Local directories: an exclusive ``flock`` on ``.ckptmgr.lock`` (through
  ``filelock``), held until :meth:`CheckpointManager.close`. The kernel drops
  it when the process dies, so a job restarted after ``kill -9`` or a
  preemption gets it back at once; a second live job is refused at its first
  save. Details of the holder go to ``.ckptmgr-owner.json`` for the message.
* Object stores have no locks. The claim is a lease object
  ``.ckptmgr-owner.json`` with a random token: the newest job writes it
  (a restarted job must be able to take over from its dead predecessor), and
  every save re-reads it before cleaning and again right before writing the
  manifest. The older job thus fails its next save with
  :class:`DirectoryInUseError` instead of committing over the newer one.
  Where the store has conditional writes (S3), the takeover is a
  compare-and-swap on the lease's ETag, so of two jobs claiming at once
  exactly one gets the lease and the other is refused. A save of the older
  job racing the takeover inside its last check-to-PUT window is not fenced by
  the lease, but its manifest is a create-only write there
  (:mod:`ckptmgr.step.commit`): it cannot replace a step the newer job
  committed. Elsewhere the lease is written after a re-read, which narrows
  the same races without closing them. ``close()`` deletes the lease, so a
  normal restart finds none and says nothing; a lease left by a job on this
  host whose process is gone (killed, preempted) is taken over with an INFO
  line; any other lease may belong to a live job, and taking it over is a WARNING.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from typing import Any, Dict, Optional

from ..errors import CheckpointError, DirectoryInUseError, StorageError, WriteConflictError
from ..io.store import Store

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "OWNER_NAME", "DirectoryOwner"]

LOCK_NAME = ".ckptmgr.lock"
OWNER_NAME = ".ckptmgr-owner.json"
#: The temp file of an interrupted write of the local owner record (LocalStore.atomic_write's naming).
_OWNER_TEMP = re.compile(r"^\." + re.escape(OWNER_NAME) + r"\.[A-Za-z0-9_]+\.tmp$")


class DirectoryOwner:
    """This manager's claim on its directory.

    Args:
        store: The manager directory.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.directory = store.root
        self.token = uuid.uuid4().hex
        self._lock: Any = None
        self._claimed = False

    def _record(self) -> Dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}

    def _read_owner(self) -> Optional[Dict[str, Any]]:
        uri = self.store.uri(OWNER_NAME)
        try:
            return _parse(self.store.read_bytes(OWNER_NAME))
        except FileNotFoundError:  # missing: nobody we can name
            return None
        except CheckpointError:
            raise
        except Exception as exc:  # network failures after the client's retries
            raise StorageError(f"reading {uri} failed: {type(exc).__name__}: {exc}",
                               "check the network and the endpoint of the checkpoint directory") from exc

    def _write_owner(self) -> None:
        self.store.write_bytes(OWNER_NAME, json.dumps(self._record()).encode("utf-8"))

    @staticmethod
    def _describe(record: Optional[Dict[str, Any]]) -> str:
        if not record:
            return "another process"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("time", 0))))
        return f"process {record.get('pid')} on {record.get('host')} (since {when})"

    def claim(self, purpose: Optional[str] = "saving into it") -> None:
        """Take the directory for this manager (idempotent; call before the first write).

        Args:
            purpose: What the claim is for, ending the refusal message (``"saving into it"``); None for no ending.

        Raises:
            DirectoryInUseError: a live job holds the local lock, or (object
                store) another job took the lease over since this one claimed it.
        """
        if self._claimed:
            self.check()
            return
        if self.store.is_local:
            self._lock_local(purpose)
        else:
            self._take_lease(purpose)
        self._claimed = True

    def _take_lease(self, purpose: Optional[str]) -> None:
        """Write the lease over the version just read (a compare-and-swap where the store has one)."""
        data, tag = self.store.read_tagged(OWNER_NAME)
        previous = _parse(data)
        if previous and previous.get("token") != self.token:
            if _gone(previous):
                logger.info("taking over %s from %s, which no longer runs", self.directory, self._describe(previous))
            else:
                logger.warning("taking over %s from %s; if that job still runs, its next save will fail",
                               self.directory, self._describe(previous))
        try:
            self.store.replace_if(OWNER_NAME, json.dumps(self._record()).encode("utf-8"), tag)
        except WriteConflictError:
            ending = f"; refusing {purpose}" if purpose else ""
            raise DirectoryInUseError(f"{self.directory} was claimed by {self._describe(self._read_owner())} at the "
                                      f"same moment{ending}") from None

    def _lock_local(self, purpose: Optional[str]) -> None:
        import filelock
        root = self.store.root
        self.store.makedirs()
        lock = filelock.FileLock(os.path.join(root, LOCK_NAME), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            ending = f"; refusing {purpose}" if purpose else ""
            raise DirectoryInUseError(f"{self.directory} is in use by {self._describe(self._read_owner())}{ending}") \
                from None
        self._lock = lock
        for name in self.store.listdir():  # a job killed while writing its record left this; we hold the lock
            if _OWNER_TEMP.match(name):
                self.store.remove(name)
        self._write_owner()

    def check(self) -> None:
        """Confirm the claim still holds (object stores: re-read the lease); a no-op before :meth:`claim`.

        Raises:
            DirectoryInUseError: another job has taken the directory over.
        """
        if not self._claimed or self._lock is not None:
            return
        record = None
        for _ in range(3):  # a flaky network reads as "no lease"; only a readable foreign token is a takeover
            record = self._read_owner()
            if record and record.get("token") == self.token:
                return
            if record:
                break
        if not record or record.get("token") != self.token:
            raise DirectoryInUseError(f"{self.directory} was taken over by {self._describe(record)}; "
                                      "this job's save is not committed",
                                      "two jobs must not save into one directory: stop one of them")

    def release(self) -> None:
        """Give the directory up: the local lock is released, an object-store lease still ours is deleted.

        Failing to delete the lease is only logged: the next job takes it over.
        """
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        elif self._claimed:
            try:
                record = self._read_owner()
                if record and record.get("token") == self.token:
                    self.store.remove(OWNER_NAME)
            except Exception as exc:  # closing must not fail over a lease
                logger.info("could not release the lease on %s: %s", self.directory, exc)
        self._claimed = False


def _parse(data: Optional[bytes]) -> Optional[Dict[str, Any]]:
    """A lease record, or None when there is none or it is torn."""
    try:
        record = json.loads(data.decode("utf-8")) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _gone(record: Dict[str, Any]) -> bool:
    """True when the lease's holder ran on this host and its process no longer exists."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False
