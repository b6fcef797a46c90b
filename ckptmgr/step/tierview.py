"""What the two tiers of a tiered manager hold, as every rank agrees on it.

A tiered manager keeps each step on every node's own disk (the local tier)
and in a persistent directory (an object store, or a filesystem every node
shares). Which copies exist changes with saves, uploads, crashes and replaced
nodes, and every decision (which step to restore, which to upload, which local
copy to delete) must be taken the same way on every rank. So each decision
starts from one :class:`TierView`: every node's leader lists its local tier,
rank 0 lists the persistent tier, and the gathered answer is the view.

A save is identified by its step *and* its manifest's commit time (the same on
every node's copy and in the persistent copy): two copies of a step are the
same checkpoint only when their times are equal. The copy that counts for a
step (:meth:`TierView.identity`) is the newest of its persistent copy and of a
local copy that every node holds; any other local copy is stale.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Tuple

from ..errors import DirectoryInUseError
from ..io.store import Store
from .index import read_manifests
from .names import parse_step_name

logger = logging.getLogger(__name__)

__all__ = ["TIER_MARKER", "TierView", "scan_local", "check_marker", "write_marker", "when"]

#: The file binding a local tier to its persistent directory.
TIER_MARKER = ".ckptmgr-tier.json"

Copies = Dict[int, str]  # step -> commit time of its manifest


def when(time: str) -> datetime:
    """A manifest's commit time as a UTC datetime (the oldest possible one when unreadable)."""
    try:
        value = datetime.fromisoformat(time)
    except (TypeError, ValueError):
        return datetime.min.replace(tzinfo=timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def scan_local(store: Store) -> Tuple[Copies, List[int]]:
    """The committed steps of a local tier with their commit times, and the step directories that are not.

    Returns:
        ``({step: time}, [steps whose directory holds no readable manifest])``.
    """
    steps = [s for s in map(parse_step_name, store.listdir()) if s is not None]
    copies: Copies = {}
    broken: List[int] = []
    for step, outcome in read_manifests(store, steps).items():
        if isinstance(outcome, BaseException):
            broken.append(step)
        else:
            copies[step] = outcome.time
    return copies, sorted(broken)


def check_marker(store: Store, persistent: str) -> None:
    """Refuse a local tier that belongs to another persistent directory.

    Raises:
        DirectoryInUseError: its marker names another directory.
    """
    try:
        bound = json.loads(store.read_bytes(TIER_MARKER).decode("utf-8")).get("directory")
    except (FileNotFoundError, ValueError, AttributeError):
        return
    if bound not in (None, persistent):
        raise DirectoryInUseError(f"local_dir {store.root} holds the local tier of {bound}, not of {persistent}",
                                  "give each persistent directory its own local_dir (or empty this one)")


def write_marker(store: Store, persistent: str) -> None:
    """Bind a local tier to its persistent directory (once)."""
    if not store.exists(TIER_MARKER):
        store.write_bytes(TIER_MARKER, json.dumps({"directory": persistent}).encode("utf-8"))


@dataclass
class TierView:
    """Both tiers as every rank agrees on them.

    Attributes:
        persistent: Committed steps of the persistent tier -> their commit times.
        nodes: Node leader -> committed steps of that node's local tier -> commit times.
        broken: Node leader -> step directories of its local tier without a readable manifest.
        skip: ``(step, time)`` copies that cannot be uploaded (their local files are damaged).
    """

    persistent: Copies
    nodes: Dict[int, Copies]
    broken: Dict[int, List[int]] = field(default_factory=dict)
    skip: List[Tuple[int, str]] = field(default_factory=list)

    @classmethod
    def from_replies(cls, replies: List[Any], leaders: List[int]) -> "TierView":
        """The view from every rank's scan (``"local"``, ``"broken"``: node leaders; ``"persistent"``: rank 0)."""
        nodes = {lead: {int(s): t for s, t in replies[lead]["local"].items()} for lead in leaders}
        broken = {lead: list(replies[lead]["broken"]) for lead in leaders}
        return cls({int(s): t for s, t in replies[0]["persistent"].items()}, nodes, broken)

    def complete(self) -> Copies:
        """Steps every node holds locally, with one commit time everywhere."""
        if not self.nodes:
            return {}
        first, *others = self.nodes.values()
        return {s: t for s, t in first.items() if all(o.get(s) == t for o in others)}

    def identity(self, step: int) -> Optional[str]:
        """The commit time of the copy of ``step`` that counts (None: no such step)."""
        local, remote = self.complete().get(step), self.persistent.get(step)
        if local is not None and (remote is None or when(local) > when(remote)):
            return local
        return remote

    def is_persistent(self, step: int) -> bool:
        """True when the persistent tier holds the copy of ``step`` that counts."""
        return step in self.persistent and self.persistent[step] == self.identity(step)

    def pending(self) -> List[int]:
        """Steps committed on every node but not (in that version) persistent: the uploads owed, oldest first."""
        return sorted(s for s, t in self.complete().items()
                      if not self.is_persistent(s) and (s, t) not in self.skip)

    def restorable(self) -> List[int]:
        """Steps this job can restore: persistent, or held locally by every node."""
        return sorted(set(self.persistent) | set(self.complete()))

    def holds(self, leader: int, step: int) -> bool:
        """True when the node of ``leader`` has the copy of ``step`` that counts."""
        time = self.nodes.get(leader, {}).get(step)
        return time is not None and time == self.identity(step)

    def stale(self) -> Dict[int, List[Tuple[int, str]]]:
        """Per node, local copies that are not the copy that counts (crashed or superseded saves)."""
        return {lead: sorted((s, t) for s, t in copies.items() if not self.holds(lead, s))
                for lead, copies in self.nodes.items()}

    def drops(self, keep: int, also: Tuple[int, ...] = ()) -> Dict[int, List[Tuple[int, str]]]:
        """Per node, the persistent steps' local copies that local retention deletes.

        A node keeps its ``keep`` newest good copies and every pending one (never
        the only complete copy of a step); the copies of the steps in ``also``
        (dropped by the persistent tier's retention) go too, unless pending.
        """
        pending = set(self.pending())
        out: Dict[int, List[Tuple[int, str]]] = {}
        for lead, copies in self.nodes.items():
            good = sorted(s for s in copies if self.holds(lead, s))
            kept = set(good[len(good) - keep:]) if keep > 0 else set()
            out[lead] = [(s, copies[s]) for s in good
                         if s not in pending and self.is_persistent(s) and (s not in kept or s in also)]
        return out

