"""Which steps a manager directory holds: one listing, manifests read once, a cached view for saves.

Listing must stay cheap: a run that keeps every 1000th of a million steps, or
a directory holding a thousand checkpoints, must not re-read a thousand
manifests on every save. :func:`read_manifests` reads the manifests of many
steps in one batch (concurrently on object stores); :class:`StepIndex` lists
the directory once per refresh, reads only manifests it has not seen, and
remembers what this process committed or deleted. It trusts that one manager
writes to a directory at a time. The operator views (``ckptmgr ls``) use
:func:`read_manifests` too, so both see a step the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Union

from ..errors import CorruptCheckpointError
from ..format.manifest import MANIFEST_NAME, Manifest
from ..io.store import Store
from .names import parse_step_name, step_name

logger = logging.getLogger(__name__)

__all__ = ["CheckpointInfo", "StepIndex", "read_manifests"]

Outcome = Union[Manifest, BaseException]


@dataclass(frozen=True)
class CheckpointInfo:
    """What retention may look at: the step, the metrics and the retention settings recorded in its manifest.

    ``time`` is the manifest's commit time (a tiered save tells copies apart by it).
    """

    step: int
    metrics: Mapping[str, Any] = field(default_factory=dict)
    time: str = ""
    retention: Optional[Mapping[str, Any]] = None


def read_manifests(store: Store, steps: Iterable[int]) -> Dict[int, Outcome]:
    """The manifest of each step directory, or why there is none.

    Returns:
        step -> :class:`Manifest` (parsed, self-checked, recording that step), or the
        exception: ``FileNotFoundError`` when the directory has no manifest (never
        committed), another exception when it is damaged or unreadable.
    """
    names = {step: f"{step_name(step)}/{MANIFEST_NAME}" for step in steps}
    raw = store.read_many(list(names.values())) if names else {}
    out: Dict[int, Outcome] = {}
    for step, name in names.items():
        data = raw[name]
        if isinstance(data, BaseException):
            out[step] = data
            continue
        try:
            manifest = Manifest.from_bytes(data, source=store.uri(name))
            if manifest.step != step:
                raise CorruptCheckpointError(f"{store.uri(name)} records step {manifest.step}")
            out[step] = manifest
        except Exception as exc:
            out[step] = exc
    return out


class StepIndex:
    """Committed steps of a manager directory with their metrics.

    Attributes:
        names: Entries of the directory at the last :meth:`refresh`.
        uncommitted: Step directories without a manifest at the last refresh.
        manifest_reads: Manifests read so far (the cost the cache saves).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.names: List[str] = []
        self.uncommitted: List[int] = []
        self.manifest_reads = 0
        self._known: Dict[int, CheckpointInfo] = {}
        self._warned: Set[int] = set()

    def refresh(self) -> Dict[int, CheckpointInfo]:
        """List the directory; read the manifests of steps not seen before. Returns step -> info, sorted."""
        self.names = self.store.listdir()
        present = {s for s in map(parse_step_name, self.names) if s is not None}
        self._known = {s: info for s, info in self._known.items() if s in present}
        todo = sorted(present - set(self._known))
        self.uncommitted = []
        for step, outcome in read_manifests(self.store, todo).items():
            self.manifest_reads += 1
            self._learn(step, outcome)
        return self.known()

    def known(self) -> Dict[int, CheckpointInfo]:
        """What the index knows now, without touching storage."""
        return dict(sorted(self._known.items()))

    def _learn(self, step: int, outcome: Outcome) -> None:
        if isinstance(outcome, FileNotFoundError):
            self.uncommitted.append(step)
        elif isinstance(outcome, BaseException):  # unreadable now: not listed, and said once
            if step not in self._warned:
                self._warned.add(step)
                logger.warning("ignoring checkpoint step %d: %s", step, outcome)
        else:
            self._known[step] = CheckpointInfo(step, outcome.metrics, outcome.time, outcome.retention)

    def add(self, step: int, metrics: Mapping[str, Any], time: str = "",
            retention: Optional[Mapping[str, Any]] = None) -> None:
        """Record a step this process just committed (``time`` and ``retention``: its manifest's)."""
        self._known[step] = CheckpointInfo(step, dict(metrics), time, retention)
        self._warned.discard(step)

    def recorded_retention(self) -> Optional[Mapping[str, Any]]:
        """The retention settings recorded by the newest known step that has them (None: none recorded)."""
        for info in sorted(self._known.values(), key=lambda i: i.step, reverse=True):
            if info.retention is not None:
                return info.retention
        return None

    def discard(self, step: int) -> None:
        """Forget a step this process deleted."""
        self._known.pop(step, None)
