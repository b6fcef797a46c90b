"""Fault injection at named points of the save (and export) path: a testing aid, inert unless armed.

Crash-consistency claims ("a kill at any instant leaves the previous or the new
checkpoint") are only worth what the tests that kill at the worst instants
prove. Random kill times rarely land in the narrow windows that matter (after
the manifest but before the rename, between two retention deletes), so the
save path calls :func:`fault_point` at those instants, and a test arms one by
name through the environment:

``CKPTMGR_FAULT_POINT=NAME[:N]``
    Fire at the N-th time (default 1st) this process reaches point ``NAME``.
``CKPTMGR_FAULT_ACTION=kill|raise``
    ``kill`` (default): SIGKILL this process, as ``kill -9`` would.
    ``raise``: raise :class:`InjectedFault` (an OSError) instead.
``CKPTMGR_FAULT_RANK=R``
    Fire only on global rank ``R`` (default: every rank).

Unarmed, a point costs one dictionary lookup. The points are listed in
:data:`POINTS`; never arm them in production.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Dict

logger = logging.getLogger(__name__)

__all__ = ["POINTS", "InjectedFault", "fault_point"]

ENV_POINT = "CKPTMGR_FAULT_POINT"
ENV_ACTION = "CKPTMGR_FAULT_ACTION"
ENV_RANK = "CKPTMGR_FAULT_RANK"

POINTS = {
    "save.prepare": "every rank, at the start of a save's prepare phase",
    "save.write": "every rank, at the start of the write phase, before its first file",
    "save.after_data_file": "after each data file is complete under its name (once per file)",
    "save.commit": "every rank, at the start of the commit phase",
    "save.before_manifest": "rank 0, after every data file is checked, before the manifest is written",
    "save.after_manifest": "rank 0, the manifest is durable but the step is not renamed into place yet",
    "save.after_rename": "rank 0, the step is committed, before retention",
    "retention.after_uncommit": "a step dropped by retention is renamed away (or its manifest deleted)",
    "retention.between_deletes": "after one retention delete, before the next",
    "export.after_file": "a directory export wrote one more file (shard, optimizer, index), before the next",
    "tier.before_local_commit": "tiered: a node leader, its node's files are written, before its local manifest",
    "tier.after_local_commit": "tiered: a node leader, its node's copy is committed, before the nodes agree",
    "tier.after_local_delete": "tiered: a local copy was deleted by retention (or as stale)",
    "upload.start": "tiered: every rank, at the start of an upload's copy phase",
    "upload.after_file": "tiered: a rank finished uploading one file (once per file)",
    "upload.before_manifest": "tiered: rank 0, every file is uploaded, before the persistent manifest",
    "upload.after_manifest": "tiered: rank 0, the step is committed in the persistent tier",
    "upload.done": "tiered: every rank, an upload is recorded, before the next upload or retention",
}

_hits: Dict[str, int] = {}


class InjectedFault(OSError):
    """The error an armed point raises with ``CKPTMGR_FAULT_ACTION=raise`` (tests only)."""


def fault_point(name: str) -> None:
    """Kill this process, or raise, when ``CKPTMGR_FAULT_POINT`` names this point; otherwise nothing.

    Args:
        name: One of :data:`POINTS`.

    Raises:
        InjectedFault: the point is armed with ``CKPTMGR_FAULT_ACTION=raise``.
    """
    armed = os.environ.get(ENV_POINT)
    if not armed:
        return
    point, _, nth = armed.partition(":")
    if point != name:
        return
    rank = os.environ.get(ENV_RANK)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth or 1):
        return
    if os.environ.get(ENV_ACTION, "kill") == "raise":
        raise InjectedFault(f"fault injected at {name} (CKPTMGR_FAULT_POINT)")
    logger.critical("fault injected at %s: killing process %d", name, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
