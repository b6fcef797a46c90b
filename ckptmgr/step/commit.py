"""How a step's files become one committed checkpoint, and how a committed one is removed.

A crash at any instant must leave each step either committed and complete or
invisible. Two protocols do that, one per kind of store (as Orbax's
temporary-path classes do); :func:`protocol_for` picks by the store's
``commit_style``:

* :class:`RenameCommit` (local disk): files go into ``.tmp-step_N-<uuid>``
  beside the final directory, each fsynced; the manifest is written last; the
  directory is renamed into place and the parent fsynced. Replacing a
  committed step swaps the two directories atomically
  (``renameat2(RENAME_EXCHANGE)``); where the kernel lacks it, two renames
  leave the old copy under ``.old-step_N-<uuid>`` for an instant, and the next
  save renames it back if the process died there.
* :class:`ManifestLastCommit` (object stores, other fsspec filesystems): data
  objects are uploaded (each atomically) into the step prefix, then the
  manifest object, whose single PUT is the commit. Replacing a committed step
  writes the new data under ``step_N/rev-<id>/`` so the old manifest stays
  valid until the new one overwrites it in one PUT. Where the store has
  conditional writes (S3), a new step's manifest is created with
  ``If-None-Match: *`` and its data goes under a ``rev-<id>/`` prefix of its
  own too: of two jobs racing to commit one step exactly one wins, the other
  gets :class:`CheckpointExistsError`, and neither writes or deletes the
  other's files. Elsewhere the manifest is written after a check that no
  manifest exists, which narrows that race without closing it.

Both uncommit before deleting (a rename away, or the manifest deleted first),
so retention never leaves a committed partial step either.
"""
from __future__ import annotations

import abc
import logging
import uuid
from typing import Any, Callable, Iterable, List

from ..errors import CheckpointExistsError, StorageError, WriteConflictError
from ..faults import fault_point
from ..format.manifest import MANIFEST_NAME, Manifest
from ..io.local import LocalStore
from ..io.store import Store
from .files import probe
from .names import is_temp_name, old_name, parse_old_name, step_name, temp_name
from .records import WritePlan

logger = logging.getLogger(__name__)

__all__ = ["CommitProtocol", "RenameCommit", "ManifestLastCommit", "protocol_for", "run_reclaims"]

Reclaim = Callable[[], None]


class CommitProtocol(abc.ABC):
    """The commit protocol of one manager directory (``store``).

    Call sequence of a save (rank 0 for all but the writes): :meth:`prepare`,
    every rank writes into ``plan.root``, :meth:`commit` (or :meth:`abort` on
    any failure). Retention calls :meth:`uncommit`; the next save calls
    :meth:`clean_leftovers` first.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        #: The directory may hold what crashed or failed saves and deletes left behind, for the next save's
        #: :meth:`clean_leftovers`. True at first (a crashed job may have left some); set again by any removal
        #: here that fails, so a manager that lists its directory only when this is set never lets them pile up.
        self.leftovers = True

    def _quietly(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except Exception as exc:  # tidying is best effort; the next save tries again
            self.leftovers = True
            logger.warning("could not remove %s: %s", args[0] if args else "?", exc)

    def _noting_failure(self, reclaim: Reclaim) -> Reclaim:
        """``reclaim``, which sets :attr:`leftovers` when it fails (what it could not free is a leftover)."""
        def run() -> None:
            try:
                reclaim()
            except BaseException:
                self.leftovers = True
                raise
        return run

    def _check_target(self, step: int, force: bool) -> str:
        final = step_name(step)
        if self.store.exists(final) and not self.store.isdir(final):
            raise StorageError(f"{self.store.uri(final)} exists and is not a checkpoint directory",
                               "move that file out of the way; ckptmgr never deletes what it did not write")
        status = probe(self.store.sub(final))
        if status == "committed" and not force:
            raise CheckpointExistsError(f"step {step} is already committed in {self.store.root}")
        if status == "damaged":
            logger.warning("replacing %s: its manifest is damaged", self.store.uri(final))
        elif status == "absent" and self.store.exists(final):
            logger.warning("replacing %s: it holds no manifest (an uncommitted or foreign copy)",
                           self.store.uri(final))
        return status

    @abc.abstractmethod
    def prepare(self, step: int, force: bool) -> WritePlan:
        """Check the step and make room for it (rank 0, before anything is written).

        Raises:
            CheckpointExistsError: ``step`` is committed and ``force`` is False.
            StorageError: a file (not a directory) has the step's name.
        """

    def check_visible(self, plan: WritePlan, manifest: Manifest) -> None:
        """Every file the manifest lists is present with its size (another rank's files included).

        Raises:
            StorageError: a file is not visible here (for a local directory: not
                on a filesystem shared by every rank).
        """
        present = self.store.list_files(plan.root)
        unseen = sorted(n for n, e in manifest.files.items() if present.get(n) != e.size)
        if unseen:
            raise StorageError(f"{', '.join(unseen)} written for step {manifest.step} are not visible in "
                               f"{self.store.uri(plan.root)}",
                               "every rank must see the same directory: use a filesystem shared by all nodes "
                               "or an object store URL")

    @abc.abstractmethod
    def commit(self, plan: WritePlan, manifest: Manifest) -> None:
        """Write the manifest last and make the step visible; then tidy what it replaced."""

    @abc.abstractmethod
    def abort(self, plan: WritePlan) -> None:
        """Remove what a failed save wrote (best effort; leftovers are cleaned at the next save)."""

    @abc.abstractmethod
    def uncommit(self, step: int) -> Reclaim:
        """Make a committed step invisible in one atomic operation; return what frees its space.

        Freeing gigabytes of file blocks takes a while; the caller may run the
        returned function later (the step is gone from every listing already).
        """

    @abc.abstractmethod
    def clean_leftovers(self, names: Iterable[str], uncommitted: Iterable[int] = ()) -> List[str]:
        """Remove what crashed saves left behind, and nothing else; returns the names removed (or restored).

        Args:
            names: The directory's entries (one listing).
            uncommitted: Steps whose directory exists without a manifest.
        """


class RenameCommit(CommitProtocol):
    """Local disk: a temporary directory renamed into place."""

    store: LocalStore

    def prepare(self, step: int, force: bool) -> WritePlan:
        self._check_target(step, force)
        final = step_name(step)
        self.store.makedirs()
        tmp = temp_name(step)
        self.store.make_dir(tmp)
        return WritePlan(final, tmp, "", self.store.exists(final))

    def commit(self, plan: WritePlan, manifest: Manifest) -> None:
        self.check_visible(plan, manifest)
        fault_point("save.before_manifest")
        self.store.write_bytes(f"{plan.write_dir}/{MANIFEST_NAME}", manifest.to_bytes())
        fault_point("save.after_manifest")  # durable manifest, still under the temporary name
        if not plan.replace:
            self.store.rename_dir(plan.write_dir, plan.final)
            return
        if self.store.exchange_dirs(plan.write_dir, plan.final):
            self._quietly(self.store.remove, plan.write_dir, recursive=True)  # now holds the replaced checkpoint
            return
        # No atomic swap here: the one window where neither copy has the final name.
        # clean_leftovers() renames the old copy back if the process dies in it.
        old = old_name(manifest.step)
        self.store.rename_dir(plan.final, old)
        try:
            self.store.rename_dir(plan.write_dir, plan.final)
        except BaseException:
            self.store.rename_dir(old, plan.final)  # put the old checkpoint back before reporting
            raise
        self._quietly(self.store.remove, old, recursive=True)

    def abort(self, plan: WritePlan) -> None:
        self._quietly(self.store.remove, plan.write_dir, recursive=True)

    def uncommit(self, step: int) -> Reclaim:
        trash = temp_name(step)
        self.store.rename_dir(step_name(step), trash)  # takes the manifest with it, atomically
        fault_point("retention.after_uncommit")

        def reclaim() -> None:
            self.store.remove(f"{trash}/{MANIFEST_NAME}")
            self.store.remove(trash, recursive=True)
        return self._noting_failure(reclaim)

    def clean_leftovers(self, names: Iterable[str], uncommitted: Iterable[int] = ()) -> List[str]:
        # A local save never writes into a final step directory, so an uncommitted one is not ours to remove.
        present = set(names)
        done = []
        for name in sorted(present):
            if is_temp_name(name):
                self._quietly(self.store.remove, name, recursive=True)
                done.append(name)
            elif parse_old_name(name):
                target = parse_old_name(name)
                if target in present:
                    self._quietly(self.store.remove, name, recursive=True)
                else:  # the process died between the two renames of a forced save: roll back
                    logger.warning("restoring %s from %s (a forced save was interrupted)", target, name)
                    self.store.rename_dir(name, str(target))
                    present.add(str(target))
                done.append(name)
        return done


class ManifestLastCommit(CommitProtocol):
    """Object stores and other fsspec filesystems: data objects first, the manifest object last."""

    def prepare(self, step: int, force: bool) -> WritePlan:
        status = self._check_target(step, force)
        final = step_name(step)
        if status == "committed" or (status == "absent" and self.store.conditional_writes()):
            # Another job may be writing this step right now: write beside it, delete nothing of it.
            prefix = f"rev-{uuid.uuid4().hex[:12]}/"
            return WritePlan(final, f"{final}/{prefix}", prefix, status == "committed")
        self.store.remove(final, recursive=True)  # uncommitted leftovers, or a damaged manifest
        return WritePlan(final, final, "", False)

    def commit(self, plan: WritePlan, manifest: Manifest) -> None:
        self.check_visible(plan, manifest)
        fault_point("save.before_manifest")
        name, data = f"{plan.final}/{MANIFEST_NAME}", manifest.to_bytes()
        if plan.replace:  # a forced save: one PUT swaps the revisions
            self.store.write_bytes(name, data)
        else:
            try:
                self.store.create_exclusive(name, data)
            except WriteConflictError as exc:
                raise CheckpointExistsError(
                    f"step {manifest.step} was committed in {self.store.root} by another job while this save wrote "
                    "it; this save is not committed",
                    "two jobs must not save into one directory: stop one of them") from exc
        fault_point("save.after_manifest")  # the manifest PUT is the commit
        if plan.prefix:
            self._quietly(self._sweep, plan.final, manifest, data)

    def _sweep(self, final: str, manifest: Manifest, data: bytes) -> None:
        """Remove what a committed step's manifest does not list: a replaced revision, files of saves that
        crashed or lost the commit (unless another job's forced save replaced ours meanwhile)."""
        if self.store.read_bytes(f"{final}/{MANIFEST_NAME}") != data:
            return
        keep = set(manifest.files) | {MANIFEST_NAME}
        for name in self.store.list_files(final):
            if name not in keep:
                self._quietly(self.store.remove, f"{final}/{name}")

    def abort(self, plan: WritePlan) -> None:
        def remove(target: str) -> None:
            if plan.prefix or not self.store.exists(f"{plan.final}/{MANIFEST_NAME}"):  # never another job's commit
                self.store.remove(target, recursive=True)
        self._quietly(remove, plan.write_dir if plan.prefix else plan.final)

    def uncommit(self, step: int) -> Reclaim:
        final = step_name(step)
        self.store.remove(f"{final}/{MANIFEST_NAME}")
        fault_point("retention.after_uncommit")
        return self._noting_failure(lambda: self.store.remove(final, recursive=True))

    def clean_leftovers(self, names: Iterable[str], uncommitted: Iterable[int] = ()) -> List[str]:
        # Step prefixes without a manifest are interrupted uploads here: nothing else writes them.
        done = []
        for step in uncommitted:
            self._quietly(self.store.remove, step_name(step), recursive=True)
            done.append(step_name(step))
        return done


def protocol_for(store: Store) -> CommitProtocol:
    """The commit protocol of a store's kind (``commit_style``)."""
    if store.commit_style == "rename":
        return RenameCommit(store)
    return ManifestLastCommit(store)


def run_reclaims(reclaims: Iterable[Reclaim]) -> None:
    """Run the space-freeing functions :meth:`CommitProtocol.uncommit` returned; failures are only logged."""
    for reclaim in reclaims:
        try:
            reclaim()
        except Exception as exc:  # the next save's leftover cleaning tries again
            logger.warning("could not free the space of a deleted checkpoint: %s", exc)
