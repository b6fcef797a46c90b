"""The steps of :meth:`CheckpointManager.restore` after its arguments are checked: choose, read, apply.

Split from :mod:`ckptmgr.manager` so that the manager reads as its public
methods: this module is the restore flow of one manager (plain or tiered),
including the warm start of a fresh run and the log line a restore ends with.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from . import distributed as dist
from .advice import warn_fresh_start
from .distributed import agree
from .state.objects import plain
from .step.load import agree_on_step
from .step.names import step_name
from .step.progress import measure
from .step.records import Applied, RestoredCheckpoint, TrainingObjects

logger = logging.getLogger(__name__)

__all__ = ["restore_step"]


def restore_step(mgr: Any, objs: TrainingObjects, step: Optional[int], *, strict: bool, rng: bool,
                 opts: Dict[str, Any]) -> Optional[RestoredCheckpoint]:
    """Restore ``step`` (or the newest good one) of ``mgr`` into ``objs`` on every rank.

    Args:
        mgr: The :class:`~ckptmgr.manager.CheckpointManager`.
        objs: What to restore into (exclusions and rank state included).
        step: The step asked for, or None for the newest good one.
        strict: As for :meth:`CheckpointManager.restore`.
        rng: Set the process's RNG streams to the saved ones.
        opts: ``verify``, ``map_location``, ``in_place``, ``on_world_size_change`` and ``strict`` for reading.

    Returns:
        What was restored, or None when nothing is committed (after a warm start from ``init_from``).
    """
    with measure("restoring", bar=dist.get_rank() == 0) as measured:
        if mgr._tiers:
            found = mgr._tiers.restore(mgr.formats, objs, step, **opts)
        else:
            found = agree_on_step(mgr.store, mgr.formats, objs, step, mgr.all_steps, signing_key=mgr.signing_key,
                                  **opts)
            found = found and (*found, mgr.store.sub(step_name(found[0])))
        if not found:
            if step is None and mgr.init_from is not None:
                mgr.init_from.load(objs.model, objs.exclude)
            else:
                warn_fresh_start(mgr.index)
            return None
        chosen, fmt, loaded, step_store = found
        if mgr.init_from is not None:
            mgr.init_from.skipped(chosen, mgr.directory)
        applied: List[Applied] = []
        agree(f"restoring step {chosen} from {mgr.directory} (apply)",
              lambda: applied.append(fmt.apply(loaded, step_store, objs, strict, rng=rng)))
    logger.info("restored checkpoint step %d from %s: %s", chosen, mgr.directory, measured.summary())
    mgr._restored_step = chosen
    if mgr._tiers:
        mgr._tiers.restored(chosen)  # uploads owed since a crash start now
    return RestoredCheckpoint(step=chosen, extra=applied[0].extra, meta=plain(loaded.get("meta") or {}),
                              metrics=dict(loaded.manifest.metrics), path=step_store.root,
                              rank_state=applied[0].rank_state)
