"""A cached view of which steps are committed in a manager directory.

Listing must stay cheap: a run that keeps every 1000th of a million steps, or
a directory holding a thousand checkpoints, must not re-read a thousand
manifests on every save. The index lists the directory once per refresh (one
request on object stores), reads manifests only of step directories it has
not seen, and remembers what this process committed or deleted. It trusts
that one manager writes to a directory at a time.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Set

from . import storage
from .errors import CorruptCheckpointError
from .manifest import MANIFEST_NAME, Manifest, parse_step_name, step_name
from .retention import CheckpointInfo

logger = logging.getLogger(__name__)

__all__ = ["StepIndex"]


class StepIndex:
    """Committed steps of ``directory`` with their metrics.

    Attributes:
        names: Entries of the directory at the last :meth:`refresh`.
        uncommitted: Step directories without a manifest at the last refresh.
        manifest_reads: Manifests read so far (the cost the cache saves).
    """

    def __init__(self, directory: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.directory = directory
        self.storage_options = storage_options
        self.names: List[str] = []
        self.uncommitted: List[int] = []
        self.manifest_reads = 0
        self._known: Dict[int, CheckpointInfo] = {}
        self._warned: Set[int] = set()

    def refresh(self) -> Dict[int, CheckpointInfo]:
        """List the directory; read the manifests of steps not seen before. Returns step -> info, sorted."""
        self.names = storage.listdir(self.directory, self.storage_options)
        present = {s for s in map(parse_step_name, self.names) if s is not None}
        self._known = {s: info for s, info in self._known.items() if s in present}
        todo = sorted(present - set(self._known))
        self.uncommitted = []
        if todo:
            uris = {s: storage.join(self.directory, step_name(s), MANIFEST_NAME) for s in todo}
            raw = storage.read_many(list(uris.values()), self.storage_options)
            self.manifest_reads += len(todo)
            for step, uri in uris.items():
                self._learn(step, uri, raw[uri])
        return self.known()

    def known(self) -> Dict[int, CheckpointInfo]:
        """What the index knows now, without touching storage."""
        return dict(sorted(self._known.items()))

    def _learn(self, step: int, uri: str, data: Any) -> None:
        if isinstance(data, FileNotFoundError):
            self.uncommitted.append(step)
            return
        try:
            if isinstance(data, BaseException):
                raise data
            manifest = Manifest.from_bytes(data, source=uri)
            if manifest.step != step:
                raise CorruptCheckpointError(f"{uri} records step {manifest.step}")
        except Exception as exc:  # unreadable now: not listed, and said once
            if step not in self._warned:
                self._warned.add(step)
                logger.warning("ignoring checkpoint step %d: %s", step, exc)
            return
        self._known[step] = CheckpointInfo(step, manifest.metrics)

    def add(self, step: int, metrics: Dict[str, Any]) -> None:
        """Record a step this process just committed."""
        self._known[step] = CheckpointInfo(step, dict(metrics))
        self._warned.discard(step)

    def discard(self, step: int) -> None:
        """Forget a step this process deleted."""
        self._known.pop(step, None)
