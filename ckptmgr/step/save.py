"""One save, agreed across ranks: prepare (rank 0) -> write (every rank) -> commit (rank 0, manifest last).

Every phase runs under :func:`ckptmgr.distributed.agree`, so an error on any
rank, including one that happened while collecting state, raises on every
rank and nothing is committed; a failed save removes what it wrote. The
order of calls is the whole protocol:

1. rank 0 runs the caller's ``before_prepare`` (claim the directory, clean
   leftovers) and :meth:`CommitProtocol.prepare`, then sends the
   :class:`WritePlan` and its checksum algorithm to every rank;
2. every rank writes its files with the step format, hashing them with rank
   0's algorithm while they are written, and reports them as :class:`RankFiles`;
3. rank 0 builds the manifest from every report (signed when a key is
   given), runs ``before_commit`` (the ownership check) and
   :meth:`CommitProtocol.commit`: the manifest is written last, and the step
   is visible from that instant.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Callable, List, Mapping, Optional, Tuple

from ..distributed import agree, get_rank, get_world_size
from ..errors import DistributedError
from ..faults import fault_point
from ..format.checksum import DEFAULT_CHECKSUM
from ..format.manifest import Manifest
from ..format.signing import SigningKey
from ..io.store import Store
from .commit import CommitProtocol
from .formats import StepFormat
from .rankstate import manifest_table
from .records import RankFiles, Snapshot, WritePlan, all_files

logger = logging.getLogger(__name__)

__all__ = ["save_step", "build_manifest"]


def build_manifest(step: int, metrics: Any, reports: List[RankFiles], world: int,
                   retention: Optional[Mapping[str, Any]] = None, checksum: str = DEFAULT_CHECKSUM) -> Manifest:
    """The commit record of a step from every rank's report (rank order); rank 0's names the components.

    Every rank's RNG file (and rank-state file, when it wrote one) is listed by rank.
    """
    components = dict(reports[0].components)
    components["rng"] = {str(rank): report.rng for rank, report in enumerate(reports)}
    rank_state = manifest_table({rank: report.rank_state for rank, report in enumerate(reports)})
    if rank_state:
        components["rank_state"] = rank_state
    return Manifest(step=step, files=all_files(reports), components=components, metrics=dict(metrics),
                    world_size=world, time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    retention=None if retention is None else dict(retention), checksum=checksum)


def save_step(store: Store, protocol: CommitProtocol, fmt: StepFormat, snapshot: Snapshot, *,
              error: Optional[BaseException], force: bool, group: Any = None,
              before_prepare: Callable[[], None] = lambda: None,
              before_commit: Callable[[], None] = lambda: None,
              signing_key: Optional[SigningKey] = None,
              retention: Callable[[], Optional[Mapping[str, Any]]] = lambda: None,
              checksum: str = DEFAULT_CHECKSUM) -> Tuple[str, Optional[Manifest]]:
    """Write and commit one step on every rank (a collective).

    Args:
        store: The manager directory.
        protocol: Its commit protocol.
        fmt: The step format that collected ``snapshot``.
        snapshot: This rank's collected (or staged) state.
        error: What went wrong while collecting on this rank, if anything; it
            is raised inside the first phase so every rank learns of it.
        force: Replace a committed step of the same number.
        group: Process group for the agreement (a background writer's private one).
        before_prepare: Rank 0, before the plan is made.
        before_commit: Rank 0, right before the manifest is written.
        signing_key: Sign the manifest with this key.
        retention: Rank 0, at the commit: the manager's retention settings, recorded in the manifest.
        checksum: The file checksum; rank 0's is used on every rank.

    Returns:
        ``(name of the committed step directory, the manifest on rank 0 / None elsewhere)``.

    Raises:
        CheckpointExistsError, StorageError, UnserializableStateError, DistributedError, ...:
            on every rank; nothing is committed.
    """
    step, rank, world = snapshot.step, get_rank(), get_world_size()
    what = f"saving step {step} to {store.root}"
    plan: Optional[WritePlan] = None
    manifest: Optional[Manifest] = None
    committed = False

    def prepare() -> Any:
        nonlocal plan
        if error is not None:
            raise error
        fault_point("save.prepare")
        if rank != 0:
            return {"step": step}
        before_prepare()
        plan = protocol.prepare(step, force)  # aborted below if any rank fails, this agreement included
        return {"step": step, "plan": plan.to_json(), "checksum": checksum}

    def write(plan: WritePlan, algorithm: str) -> Any:
        fault_point("save.write")
        return fmt.write(store.sub(plan.root), plan.prefix, snapshot, rank, group, checksum=algorithm).to_json()

    def commit(plan: WritePlan, written: List[Any]) -> None:
        nonlocal manifest, committed
        fault_point("save.commit")
        if rank == 0:
            manifest = build_manifest(step, snapshot.metrics, [RankFiles.from_json(r) for r in written], world,
                                      retention(), checksum)
            if signing_key is not None:
                signing_key.sign(manifest)
            before_commit()
            protocol.commit(plan, manifest)
            committed = True

    try:
        replies = agree(f"{what} (prepare)", prepare, group)
        if len({r["step"] for r in replies}) != 1:
            raise DistributedError(f"{what}: ranks passed different steps {[r['step'] for r in replies]}",
                                   "call save() with the same step on every rank")
        chosen = plan = WritePlan(**replies[0]["plan"])
        algorithm = str(replies[0]["checksum"])
        written = agree(f"{what} (write)", lambda: write(chosen, algorithm), group)
        agree(f"{what} (commit)", lambda: commit(chosen, written), group)
        committed = True
    finally:
        if not committed and rank == 0 and plan is not None:  # never undo a commit that happened
            protocol.abort(plan)
    return chosen.final, manifest
