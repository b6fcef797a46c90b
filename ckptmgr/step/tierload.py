"""Restoring from two tiers: each rank reads its node's verified local copy, or the persistent one.

The ranks agree on one view of both tiers (:class:`~.tierview.TierView`) and
try the restorable steps newest first. For a step, each rank reads from its
node's local tier when that node holds the copy that counts and it has every
file this rank needs (a wiped or replaced node has none), checking every byte
against the manifest as it reads; a local copy that fails falls back to the
persistent copy *of the same step*. A step every node holds but that is not
persistent yet, which some rank cannot read locally (a damaged file, ranks
placed on other nodes than before), is first uploaded from the intact copies,
then read from the persistent tier. Only when a step cannot be read on every
rank is an older one tried.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

from ..distributed import agree
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..format.manifest import Manifest
from ..format.maplocation import MapLocation
from ..io.store import Store
from ..sharded.layout import METADATA_NAME
from .files import read_manifest
from .formats import Formats, StepFormat
from .load import read_step
from .names import step_name
from .records import COMPONENTS, LoadedStep, TrainingObjects
from .tierview import TierView

logger = logging.getLogger(__name__)

__all__ = ["needs", "restore_tiered"]

Found = Tuple[int, StepFormat, LoadedStep, Store]
# ``tiers`` below is a :class:`ckptmgr.step.tiers.TieredSteps` (not imported: it imports this module).


def needs(manifest: Manifest, rank: int) -> List[str]:
    """The files ``rank`` reads to restore a step: every component, its RNG file, and all shards of a sharded step."""
    names = [manifest.file_for(c) for c in ("model",) + COMPONENTS]
    names.append(manifest.rng_file(rank))
    sharded = manifest.components.get("sharded")
    if isinstance(sharded, dict):  # DCP may read any rank's shards: only a node that holds all of them will do
        names += [manifest.rng_file(r) for r in range(manifest.world_size)]
        names.append(sharded.get("metadata") or METADATA_NAME)
    return sorted({n for n in names if n})


def _read(root: Store, step: int, rank: int, formats: Formats, objs: TrainingObjects, opts: Dict[str, Any]
          ) -> Tuple[StepFormat, LoadedStep, Store]:
    manifest = read_manifest(root.sub(step_name(step)))
    sharded = isinstance(manifest.components.get("sharded"), dict)
    fmt, loaded = read_step(root, step, rank, formats, objs, check_all=sharded, **opts)
    return fmt, loaded, root.sub(step_name(step))


def _local_usable(tiers: Any, step: int) -> bool:
    try:
        manifest = read_manifest(tiers.local.sub(step_name(step)))
    except (CheckpointNotFoundError, CorruptCheckpointError):
        return False
    return set(needs(manifest, tiers.layout.rank)) <= set(manifest.files)


def _attempt(tiers: Any, view: TierView, step: int, got: Dict[str, Any], formats: Formats,
             objs: TrainingObjects, opts: Dict[str, Any]) -> str:
    """Read this rank's part of ``step``: local if possible, else (or when damaged) persistent."""
    rank, persistent = tiers.layout.rank, view.is_persistent(step)
    if view.holds(tiers.layout.leader, step) and _local_usable(tiers, step):
        try:
            got["read"] = _read(tiers.local, step, rank, formats, objs, opts)
            return "local"
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if not persistent:
                raise
            logger.warning("the local copy of step %d is damaged (%s); reading the persistent copy", step, exc)
    if not persistent:
        raise CheckpointNotFoundError(f"step {step} is not on this node's local tier ({tiers.local.root}) "
                                      f"and not in {tiers.p.store.root} yet")
    got["read"] = _read(tiers.p.store, step, rank, formats, objs, opts)
    return "persistent"


def _restore_step(tiers: Any, view: TierView, step: int, formats: Formats, objs: TrainingObjects,
                  opts: Dict[str, Any]) -> Tuple[StepFormat, LoadedStep, Store]:
    got: Dict[str, Any] = {}
    what = f"restoring step {step} from {tiers.p.store.root} and the local tiers"
    try:
        sources = agree(f"{what} (read)", lambda: _attempt(tiers, view, step, got, formats, objs, opts))
        logger.info("%s: ranks read from %s", what, sources)
    except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
        if step not in view.pending():
            raise
        logger.warning("%s: some rank cannot read it locally (%s); uploading it from the intact copies first",
                       what, exc)
        tiers.upload(step, view)
        agree(f"{what} (read the persistent copy)",
              lambda: None if "read" in got else got.update(read=_read(tiers.p.store, step, tiers.layout.rank,
                                                                       formats, objs, opts)))
    fmt, loaded, store = got["read"]
    return fmt, loaded, store


def restore_tiered(tiers: Any, formats: Formats, objs: TrainingObjects, step: Optional[int], *,
                   verify: bool, map_location: MapLocation, in_place: bool,
                   on_world_size_change: str = "error", strict: Optional[bool] = None) -> Optional[Found]:
    """Every rank's part of the step to restore (a collective; nothing is applied).

    Returns:
        ``(step, its format, what this rank read, the step directory it read from)``, or None when
        no step is restorable.

    Raises:
        CheckpointNotFoundError: ``step`` is neither persistent nor held by every node.
        ChecksumError, CorruptCheckpointError: ``step`` is damaged, or every step is (on every rank).
    """
    view = tiers.scan(f"restoring from {tiers.p.store.root}", tolerant=True)
    tiers.note(view)
    opts = {"verify": verify, "map_location": map_location, "in_place": in_place,
            "on_world_size_change": on_world_size_change, "strict": strict}
    candidates = view.restorable()
    if step is not None:
        if step not in candidates:
            raise CheckpointNotFoundError(f"step {step} is neither committed in {tiers.p.store.root} nor held by "
                                          "every node's local tier", "`ckptmgr ls DIR --local-dir LOCAL` lists "
                                          "the steps and where they are")
        candidates = [step]
    failures = []
    for candidate in sorted(candidates, reverse=True):
        try:
            return (candidate, *_restore_step(tiers, view, candidate, formats, objs, opts))
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if step is not None:
                raise
            logger.warning("checkpoint step %d cannot be restored, trying an older one: %s", candidate, exc)
            failures.append(f"step {candidate}: {exc}")
    if failures:
        raise CorruptCheckpointError(f"every checkpoint in {tiers.p.store.root} and the local tiers is damaged:\n"
                                     + "\n".join(failures))
    return None
