"""One tiered save's first half: every node commits the step to its own disk, agreed across ranks.

The order of calls is the protocol (each phase under :func:`~ckptmgr.distributed.agree`,
so an error on any rank raises on every rank):

1. prepare: rank 0 refuses a step that is committed already and fixes the
   commit time; every node's leader claims its local directory, removes
   crashed saves' leftovers and makes a temporary directory
   (:class:`~ckptmgr.step.commit.RenameCommit`);
2. write: every rank writes its files into its node's temporary directory;
   each leader also writes the replicated state, so a node can restore from
   its own disk alone;
3. ship: the replicated files must be the same bytes on every node (a copy
   that differs would restore differently from the persistent one): a
   leader's file whose checksum differs from rank 0's (``meta.json`` always
   does, it holds the time) is replaced by rank 0's bytes, sent through the
   collective when they are small, else left out of that node's copy (that
   node then reads the file from the persistent tier);
4. commit: every leader writes its node's manifest (the files on that node,
   the components of the whole step, one commit time) and renames the
   directory into place. If any node fails, the nodes that committed roll
   their copy back: a step is committed locally on every node or on none
   (a crash in this phase can leave copies on some nodes; the next manager
   sees they are incomplete and deletes them).
"""
from __future__ import annotations

import base64
import logging
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..distributed import agree
from ..distributed.nodes import NodeLayout
from ..errors import DistributedError
from ..faults import fault_point
from ..format.checksum import DEFAULT_CHECKSUM, FileEntry, digest_of
from ..format.manifest import Manifest
from ..io.store import Store
from .commit import RenameCommit
from .formats import StepFormat
from .records import RankFiles, Snapshot, WritePlan

logger = logging.getLogger(__name__)

__all__ = ["SHIP_LIMIT", "save_local", "node_manifest", "mismatches"]

#: Replicated bytes (in all) that rank 0 sends to the other nodes in one save; more are left out there.
SHIP_LIMIT = 64 * 1024 * 1024


def mismatches(reports: List[RankFiles], layout: NodeLayout) -> Dict[int, Set[str]]:
    """Per node leader (rank 0's node aside), the replicated files whose bytes differ from rank 0's."""
    ref = reports[0].files
    out: Dict[int, Set[str]] = {}
    for lead in layout.leaders:
        if lead != 0:
            out[lead] = {n for n, e in reports[lead].files.items() if n in ref and ref[n] != e}
    return out


def node_manifest(step: int, time: str, metrics: Dict[str, Any], reports: List[RankFiles], layout: NodeLayout,
                  leader: int, left_out: Set[str], checksum: str = DEFAULT_CHECKSUM) -> Manifest:
    """The manifest of one node's copy: the files on that node (rank 0's entries for replicated ones)."""
    files: Dict[str, FileEntry] = {}
    for rank in layout.members(leader):
        files.update(reports[rank].files)
    for name in list(files):
        if name in left_out:
            del files[name]
        elif name in reports[0].files:
            files[name] = reports[0].files[name]
    components = dict(reports[0].components)
    components["rng"] = {str(rank): report.rng for rank, report in enumerate(reports)}
    return Manifest(step=step, files=files, components=components, metrics=dict(metrics),
                    world_size=layout.world, time=time, checksum=checksum)


def _commit_time() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def save_local(layout: NodeLayout, local: Store, protocol: RenameCommit, fmt: StepFormat, snapshot: Snapshot, *,
               error: Optional[BaseException], force: bool, group: Any = None,
               check_target: Callable[[int, bool], None] = lambda step, force: None,
               before_prepare: Callable[[], None] = lambda: None,
               checksum: str = DEFAULT_CHECKSUM) -> Tuple[str, Optional[Manifest]]:
    """Write ``snapshot`` and commit it on every node's local tier (a collective).

    Args:
        layout: Which ranks share a node.
        local: This node's local tier.
        protocol: Its commit protocol.
        fmt: The step format that collected ``snapshot`` (leaders collected the replicated state too).
        snapshot: This rank's collected (or staged) state.
        error: What went wrong while collecting on this rank (raised in the first phase, on every rank).
        force: Replace a committed step of the same number.
        group: Process group for the agreement.
        check_target: Rank 0, first: refuse a step committed in the persistent tier.
        before_prepare: Node leaders, before the plan: claim the local directory, clean leftovers.
        checksum: The per-file checksum to write and record.

    Returns:
        ``(name of the step directory, this node's manifest on leaders / None elsewhere)``.

    Raises:
        CheckpointExistsError, StorageError, DistributedError, ...: on every rank; nothing is committed.
    """
    step, rank = snapshot.step, layout.rank
    what = f"saving step {step} to the local tier {local.root}"
    state: Dict[str, Any] = {"plan": None, "committed": False, "manifest": None}

    def prepare() -> Any:
        if error is not None:
            raise error
        fault_point("save.prepare")
        reply: Dict[str, Any] = {"step": step}
        if rank == 0:
            check_target(step, force)
            reply.update(time=_commit_time(), metrics=dict(snapshot.metrics))
        if layout.is_leader:
            before_prepare()
            state["plan"] = protocol.prepare(step, force)
            reply["plan"] = state["plan"].to_json()
        return reply

    try:
        replies = agree(f"{what} (prepare)", prepare, group)
        if len({r["step"] for r in replies}) != 1:
            raise DistributedError(f"{what}: ranks passed different steps {[r['step'] for r in replies]}",
                                   "call save() with the same step on every rank")
        plan = WritePlan(**replies[layout.leader]["plan"])
        time, metrics = replies[0]["time"], replies[0]["metrics"]

        def write() -> Any:
            fault_point("save.write")
            return fmt.write(local.sub(plan.root), plan.prefix, snapshot, rank, group, checksum).to_json()
        reports = [RankFiles.from_json(r) for r in agree(f"{what} (write)", write, group)]
        differ = mismatches(reports, layout)
        shipped = _ship(differ, reports, local.sub(plan.root), rank, group, what)

        def commit() -> None:
            fault_point("save.commit")
            if not layout.is_leader:
                return
            left_out = _settle(local.sub(plan.root), differ.get(rank, set()), shipped, reports[0], checksum)
            manifest = node_manifest(step, time, metrics, reports, layout, rank, left_out, checksum)
            fault_point("tier.before_local_commit")
            protocol.commit(plan, manifest)
            state["committed"], state["manifest"] = True, manifest
            fault_point("tier.after_local_commit")
        agree(f"{what} (commit)", commit, group)
    except BaseException:
        _undo(protocol, state, step)
        raise
    return plan.final, state["manifest"]


def _ship(differ: Dict[int, Set[str]], reports: List[RankFiles], root: Store, rank: int, group: Any,
          what: str) -> Dict[str, bytes]:
    """Rank 0's bytes of the replicated files that differ on some node (when they fit :data:`SHIP_LIMIT`)."""
    names = sorted(set().union(*differ.values())) if differ else []
    if not names or sum(reports[0].files[n].size for n in names) > SHIP_LIMIT:
        if names:
            logger.warning("%s: replicated files %s differ between nodes and are too large to send; those nodes "
                           "will read them from the persistent tier", what, names)
        return {}

    def send() -> Any:
        if rank != 0:
            return None
        return {n: base64.b64encode(root.read_bytes(n)).decode("ascii") for n in names}
    payload = agree(f"{what} (ship)", send, group)[0]
    return {n: base64.b64decode(data) for n, data in payload.items()}


def _settle(root: Store, differ: Set[str], shipped: Dict[str, bytes], reference: RankFiles,
            checksum: str) -> Set[str]:
    """Replace this node's differing replicated files by rank 0's; returns the names left out of this node."""
    left_out = set()
    for name in sorted(differ):
        data = shipped.get(name)
        if data is None:
            root.remove(name)
            left_out.add(name)
            continue
        if FileEntry(len(data), digest_of(data, checksum)) != reference.files[name]:
            raise DistributedError(f"{name} sent by rank 0 differs from rank 0's own report",
                                   "the collective corrupted data; retry the save")
        root.write_bytes(name, data)
    if differ:
        root.sync_dir()
    return left_out


def _undo(protocol: RenameCommit, state: Dict[str, Any], step: int) -> None:
    """A failed local save: remove what this node wrote, or roll back its commit (best effort)."""
    try:
        if state["committed"]:
            logger.warning("rolling back the local copy of step %d: another node failed to commit it", step)
            protocol.uncommit(step)()
        elif state["plan"] is not None:
            protocol.abort(state["plan"])
    except Exception as exc:  # the next manager finds the copy incomplete and deletes it
        logger.warning("could not undo the local copy of step %d: %s", step, exc)
