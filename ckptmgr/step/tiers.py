"""Tiered checkpoints: every node's own disk first, the persistent directory (an object store) behind it.

Clusters without a fast shared filesystem give each node a local disk and an
object store. A tiered manager commits each step on every node's local disk
(:mod:`.localsave`, quick), then uploads it to the persistent tier in the
background with that tier's own commit protocol (:mod:`.upload`). Restores
read from local disks where the copy is there and checks out, and from the
persistent tier otherwise (:mod:`.tierload`). Every decision starts from one
:class:`~.tierview.TierView` that all ranks agree on.

Rules that keep runs safe:

* a step is restorable when it is committed in the persistent tier, or
  committed on every node's local tier (uploads owed are made later, also by
  the next manager after a crash: before any retention runs);
* local retention deletes only copies of steps that are persistent (never
  the only complete copy); the copies of steps the persistent tier's
  retention drops are deleted locally first, so no upload brings them back;
* uploads run on one background thread with its own process group; their
  errors are raised by the next ``save``, ``wait`` or ``close``, and the
  step stays owed;
* local copies that are not the copy that counts (a crashed save's partial
  commit, a superseded version) are deleted only at a quiet point: the first
  save after the view that found them.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..distributed import agree, get_world_size, new_control_group
from ..distributed.nodes import node_layout
from ..errors import CheckpointError, CheckpointExistsError, CorruptCheckpointError, StorageError
from ..faults import fault_point
from ..format.checksum import DEFAULT_CHECKSUM
from ..io.access import open_store
from ..io.store import Store
from .background import Background
from .commit import CommitProtocol, RenameCommit, run_reclaims
from .files import read_manifest
from .formats import StepFormat
from .index import StepIndex
from .localsave import save_local
from .names import step_name
from .ownership import DirectoryOwner
from .records import Snapshot
from .tierview import TierView, check_marker, scan_local, write_marker
from .upload import upload_step

logger = logging.getLogger(__name__)

__all__ = ["Persistent", "TieredSteps"]


@dataclass
class Persistent:
    """The manager's persistent directory as the tiers use it.

    Attributes:
        store: The directory.
        protocol: Its commit protocol.
        index: Its committed steps (shared with the manager; guarded by ``lock``).
        lock: Guards ``index``.
        owner: The manager's claim on the directory.
        prepare: Rank 0, before an upload: claim the directory, remove interrupted uploads.
        retention: ``retention(infos, protected=...) -> steps the policy drops``.
        reclaimer: The background worker that frees the space of uncommitted steps.
        checksum: The per-file checksum of the steps the tiers write (the manager's).
    """

    store: Store
    protocol: CommitProtocol
    index: StepIndex
    lock: Any
    owner: DirectoryOwner
    prepare: Callable[[], None]
    retention: Callable[..., List[int]]
    reclaimer: Background
    checksum: str = DEFAULT_CHECKSUM


class TieredSteps:
    """The local tier of one manager and the uploads to its persistent tier.

    Constructing it is a collective (every rank): it learns which ranks share a
    node, creates the uploader's private process group and agrees on what both
    tiers hold.

    Args:
        persistent: The persistent tier.
        local_dir: A path on each node's own disk (the same string on every node).
        keep: ``local_max_to_keep``: local copies of persistent steps each node keeps.

    Raises:
        ValueError: ``keep`` is negative, ``local_dir`` is not a local path or is the persistent directory.
        DirectoryInUseError: ``local_dir`` holds the local tier of another persistent directory.
    """

    def __init__(self, persistent: Persistent, local_dir: Any, keep: int) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"local_max_to_keep must be an int >= 0, got {keep!r}")
        local = open_store(local_dir)
        if not local.is_local:
            raise ValueError(f"local_dir must be a path on each node's own disk, got {local_dir!r}")
        if local.root == persistent.store.root:
            raise ValueError("local_dir must differ from the checkpoint directory")
        self.p, self.local, self.keep = persistent, local, keep
        self.protocol = RenameCommit(local)
        self.owner = DirectoryOwner(local)
        self.layout = node_layout()
        self.group = new_control_group() if get_world_size() > 1 else None
        self.uploader = Background(f"ckptmgr-upload:{local.root}")
        self._lock = threading.Lock()
        self._skip: List[Tuple[int, str]] = []
        self._restored: Optional[int] = None
        self._cleanup: List[Tuple[int, str]] = []
        self._broken: List[int] = []
        self._known: Set[int] = set()
        self._owed = False
        self._error: Optional[BaseException] = None
        self.note(self.scan(f"opening the local tier {local.root}", tolerant=True))

    # ------------------------------------------------------------------ the view

    def scan(self, what: str, group: Any = None, tolerant: bool = False) -> TierView:
        """Agree on what both tiers hold (a collective): leaders list their local tier, rank 0 the persistent one.

        With ``tolerant``, an unreachable persistent tier counts as empty (a restore can go by the local tiers).
        """
        def report() -> Dict[str, Any]:
            out: Dict[str, Any] = {"local": {}, "broken": [], "persistent": {}}
            if self.layout.is_leader:
                check_marker(self.local, self.p.store.root)
                out["local"], out["broken"] = scan_local(self.local)
            if self.layout.rank == 0:
                try:
                    with self.p.lock:
                        out["persistent"] = {s: i.time for s, i in self.p.index.refresh().items()}
                except Exception as exc:  # the network, the endpoint, credentials: whatever the client raises
                    if not tolerant:
                        if isinstance(exc, CheckpointError):
                            raise
                        raise StorageError(f"listing {self.p.store.root} failed: {type(exc).__name__}: {exc}",
                                           "check the network and the endpoint; the upload is retried with the "
                                           "next save") from exc
                    logger.warning("cannot list %s (%s); going by the local tiers alone", self.p.store.root, exc)
            return out
        view = TierView.from_replies(agree(f"{what} (scan)", report, group), self.layout.leaders)
        view.skip = list(self._skip)
        return view

    def note(self, view: TierView) -> None:
        """Take in a view made at a quiet point (no save or upload running): what to clean, what is owed."""
        with self._lock:
            self._known = set(view.complete())
        lead = self.layout.leader
        self._cleanup = view.stale().get(lead, []) if self.layout.is_leader else []
        self._broken = view.broken.get(lead, []) if self.layout.is_leader else []
        self._owed = bool(view.pending())
        if self._owed:
            logger.info("steps %s are committed on every node but not in %s yet; they are uploaded next",
                        view.pending(), self.p.store.root)

    def restorable(self, persistent: List[int]) -> List[int]:
        """Steps this job can restore: ``persistent`` ones and those every node holds locally."""
        with self._lock:
            return sorted(set(persistent) | self._known)

    # ------------------------------------------------------------------ save

    def save(self, fmt: StepFormat, snapshot: Snapshot, error: Optional[BaseException], force: bool,
             group: Any) -> str:
        """Commit ``snapshot`` on every node's local tier (a collective), then schedule its upload.

        Returns:
            The step directory on this node's local tier.
        """
        if force:  # a forced save replaces a local copy an upload may be reading: let it finish first
            self._settle_uploads()
        name, _ = save_local(self.layout, self.local, self.protocol, fmt, snapshot, error=error, force=force,
                             group=group, check_target=self._check_target, before_prepare=self._before_prepare,
                             checksum=self.p.checksum)
        with self._lock:
            self._known.add(snapshot.step)
        logger.info("committed checkpoint step %d on every node's local tier", snapshot.step)
        self.schedule_upload()
        return self.local.uri(name)

    def _check_target(self, step: int, force: bool) -> None:
        with self.p.lock:
            persistent = step in self.p.index.known()
        if persistent and not force:
            raise CheckpointExistsError(f"step {step} is already committed in {self.p.store.root}")

    def _before_prepare(self) -> None:
        """Node leaders: claim the local tier, bind it, remove leftovers and the stale copies the last view found."""
        self.owner.claim()
        write_marker(self.local, self.p.store.root)
        self.protocol.clean_leftovers(self.local.listdir())
        cleanup, self._cleanup = self._cleanup, []
        self._drop_local(cleanup, "a stale or incomplete copy")
        broken, self._broken = self._broken, []
        for step in broken:
            logger.warning("removing %s from the local tier: it holds no readable manifest",
                           self.local.uri(step_name(step)))
            self.local.remove(step_name(step), recursive=True)

    def _drop_local(self, copies: List[Tuple[int, str]], why: str) -> None:
        """Delete these local copies (each only if its commit time still matches); failures are only logged."""
        for step, time in copies:
            try:
                if read_manifest(self.local.sub(step_name(step))).time != time:
                    continue
                self.protocol.uncommit(step)()
            except (CorruptCheckpointError, FileNotFoundError, StorageError, OSError) as exc:
                logger.warning("could not delete the local copy of step %d: %s", step, exc)
                continue
            logger.info("deleted the local copy of step %d (%s)", step, why)
            fault_point("tier.after_local_delete")

    # ------------------------------------------------------------------ uploads

    def schedule_upload(self) -> None:
        """Start uploading every owed step in the background (one upload job in flight).

        Raises:
            Exception: an earlier upload job's error (raised after the new job is started).
        """
        self._settle_uploads()
        self._owed = False
        self.uploader.submit(self._upload_owed, what="uploading checkpoints")
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _settle_uploads(self) -> None:
        """Wait for the upload job in flight; keep its error for the caller of :meth:`schedule_upload`."""
        try:
            self.uploader.wait()
        except Exception as exc:
            self._error = self._error or exc

    def upload(self, step: int, view: TierView, group: Any = None) -> None:
        """Upload one owed step now (a collective) and record it in ``view``."""
        time = view.complete()[step]
        manifest = upload_step(self.layout, self.local, self.p.store, self.p.protocol, step, time, group=group,
                               before_prepare=self.p.prepare, before_commit=self.p.owner.check)
        if manifest is not None:  # rank 0
            with self.p.lock:
                self.p.index.add(step, manifest.metrics, manifest.time)
            logger.info("checkpoint step %d is persistent in %s", step, self.p.store.root)
        view.persistent[step] = time
        fault_point("upload.done")

    def _upload_owed(self) -> None:
        """The background job: upload every owed step (oldest first), then apply both tiers' retention."""
        view = self.scan("uploading checkpoints", self.group)
        uploaded: List[int] = []
        damaged: Optional[BaseException] = None
        for step in view.pending():
            try:
                self.upload(step, view, self.group)
            except CorruptCheckpointError as exc:  # damaged local files: this copy can never be uploaded
                self._skip.append((step, view.complete()[step]))
                logger.error("step %d cannot be uploaded and stays local only: %s", step, exc)
                damaged = damaged or exc
                continue
            uploaded.append(step)
        self._retain(view, uploaded)
        if damaged is not None:
            raise damaged

    def _retain(self, view: TierView, uploaded: List[int]) -> None:
        """The persistent policy's drops (local copies first), then local retention."""
        def decide() -> Any:
            if self.layout.rank != 0:
                return None
            with self.p.lock:
                infos = list(self.p.index.known().values())
            protected = set(uploaded[-1:])
            if self._restored is not None and infos and self._restored == max(i.step for i in infos):
                protected.add(self._restored)
            return self.p.retention(infos, protected=protected)
        dropped: List[int] = agree("retention (decide)", decide, self.group)[0]
        local = view.drops(self.keep, tuple(dropped)).get(self.layout.leader, [])
        agree("retention (local tier)",
              lambda: self._drop_local(local, "retention") if self.layout.is_leader else None, self.group)
        with self._lock:
            self._known -= {s for s, _ in local} | set(dropped)

        def persistent() -> None:
            if self.layout.rank != 0:
                return
            reclaims = []
            for step in dropped:
                try:
                    reclaims.append(self.p.protocol.uncommit(step))
                except Exception as exc:  # the new checkpoint is committed; deleting can wait
                    logger.warning("retention could not delete step %d: %s", step, exc)
                    continue
                with self.p.lock:
                    self.p.index.discard(step)
                logger.info("retention deleted checkpoint step %d", step)
                fault_point("retention.between_deletes")
            if reclaims:
                self.p.reclaimer.submit(lambda: run_reclaims(reclaims), what="freeing deleted checkpoints")
        agree("retention (persistent tier)", persistent, self.group)

    # ------------------------------------------------------------------ restore and lifecycle

    def restore(self, formats: Any, objs: Any, step: Optional[int], **opts: Any) -> Any:
        """Every rank's part of the step to restore (see :func:`ckptmgr.step.tierload.restore_tiered`)."""
        from .tierload import restore_tiered
        return restore_tiered(self, formats, objs, step, **opts)

    def restored(self, step: int) -> None:
        """After a restore: protect the step from retention while newest; start the uploads owed."""
        self._restored = step
        if self._owed:
            self.schedule_upload()

    def wait(self) -> None:
        """Block until the upload job in flight is done.

        Raises:
            Exception: what it (or an earlier job) raised.
        """
        self._settle_uploads()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Upload what is owed and wait for it (:meth:`release` then frees the thread and the local tier).

        Raises:
            Exception: what an upload raised.
        """
        if self._owed:
            self.schedule_upload()
        self.wait()

    def release(self) -> None:
        """Stop the upload thread (after its job) and release the local tier; never raises."""
        try:
            self.uploader.close()
        except Exception as exc:  # close() already reported what it could; this one only ends the thread
            logger.warning("an upload failed while the manager closed: %s", exc)
        finally:
            self.owner.release()
