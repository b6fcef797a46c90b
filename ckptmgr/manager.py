"""CheckpointManager: rotating, atomically committed, verified checkpoints, and resume.

This module only orchestrates; the layers below do the work:

* save: the step format collects this rank's state (:mod:`ckptmgr.step.formats`;
  staged into reused buffers for an async save) -> :func:`ckptmgr.step.save.save_step`
  has every rank write its files and rank 0 write the manifest last through the
  directory's commit protocol (:mod:`ckptmgr.step.commit`) -> retention
  (:mod:`ckptmgr.retention`) uncommits what the policy drops.
* restore: rank 0 picks the newest step that checks out (:mod:`ckptmgr.step.load`),
  every rank reads its part, then the step's format applies it to the live objects.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

from . import distributed as dist
from .distributed import agree
from .errors import CheckpointError
from .faults import fault_point
from .format.checksum import DEFAULT_CHECKSUM, check_checksum
from .format.maplocation import MapLocation
from .io.access import open_store
from .io.store import Options, Store
from .retention import best_of, build_policy, steps_to_delete
from .state.objects import check_index, plain
from .state.staging import StagingBuffers
from .step.background import Background
from .step.commit import protocol_for, run_reclaims
from .step.formats import Formats, StepFormat
from .step.index import StepIndex
from .step.load import agree_on_step
from .step.names import step_name
from .step.ownership import DirectoryOwner
from .step.records import RestoredCheckpoint, Snapshot, TrainingObjects
from .step.save import save_step

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "RestoredCheckpoint", "resume_from_latest"]


class CheckpointManager:
    """Saves, rotates and restores complete training checkpoints in one directory.

    Each ``save`` writes ``step_00000100/`` holding ``model.safetensors`` (bare
    model keys), ``optimizer``/``scheduler``/``scaler``/``extra`` files (JSON, or
    safetensors with the JSON structure in the header when they hold tensors),
    ``meta.json``, one ``rng-rank00000.safetensors`` per rank, and, last,
    ``manifest.json`` with every file's size and checksum: the commit. Nothing
    is ever unpickled.

    Under ``torch.distributed`` every rank calls ``save``/``restore`` with the
    same arguments: rank 0 writes the replicated state, every rank its RNG file,
    and ranks agree on the outcome (errors on any rank raise on all, with the
    timeout of :func:`ckptmgr.distributed.default_timeout`). For a local
    directory, rank 0 creates the temporary directory and the other ranks write
    into it, so a local path must be on a filesystem shared by all nodes; on
    separate node-local disks use an object store (``s3://...``) instead.

    One manager (one job) writes to a directory at a time: its first save removes the
    temporary directories that crashed saves left there, and its listing cache
    assumes nobody else commits or deletes steps meanwhile.

    Args:
        directory: Local path or fsspec URL (``s3://bucket/run1``).
        max_to_keep: Keep this many newest checkpoints (None: keep all).
        keep_every_n_steps: Also keep every step divisible by this.
        best_metric: Metric name that ranks checkpoints for ``keep_best`` and :meth:`best_step`.
        best_mode: ``'min'`` (lower is better) or ``'max'``.
        keep_best: Also keep this many best checkpoints by ``best_metric``; a
            checkpoint without that metric never counts as best.
        async_save: ``save`` returns once the state is copied into reused CPU
            staging buffers (pinned when CUDA is available); a background thread
            writes, commits and applies retention. One save is in flight at a
            time (the next ``save`` waits for it), and an error in the background
            is raised by the next ``save``, :meth:`wait` or :meth:`close`. Under
            torch.distributed the constructor is then a collective (it creates a
            private gloo group for the background agreement).
        storage_options: fsspec options (credentials, endpoint) for URLs.
        sharded: ``'auto'`` (default): a model whose parameters are DTensors
            (FSDP2 ``fully_shard``, tensor parallel) is saved sharded; True:
            always; False: never. Sharded saves write model and optimizer state
            from every rank with torch.distributed.checkpoint (see
            :mod:`ckptmgr.sharded`), inside the same commit protocol; restore
            reshards to any number of ranks. Its metadata is a pickle, checked
            against the manifest before it is read: sharded checkpoints are only
            as trustworthy as their source.
        checksum: Per-file checksum, verified on restore: ``'xxh3'`` (XXH3-128, at memory
            speed) or ``'sha256'`` (as ckptmgr 0.1; slower). Restores use the one a manifest names.

    Raises:
        ValueError: an argument is out of range (see :func:`ckptmgr.retention.build_policy`),
            or ``checksum`` is not one of ``'xxh3'``, ``'sha256'``.
        UnknownSchemeError: ``directory`` is a URL of a protocol fsspec does not know.
    """

    def __init__(self, directory: Any, max_to_keep: Optional[int] = 5, keep_every_n_steps: Optional[int] = None,
                 best_metric: Optional[str] = None, best_mode: str = "min", keep_best: int = 0,
                 async_save: bool = False, storage_options: Options = None, sharded: Any = "auto",
                 checksum: str = DEFAULT_CHECKSUM) -> None:
        self.store: Store = open_store(os.fspath(directory), storage_options)
        self.directory: str = self.store.root
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.policy = build_policy(max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best)
        self.storage_options = storage_options
        self.checksum = check_checksum(checksum)
        self.async_save = bool(async_save)
        self.formats = Formats(sharded)
        self.sharded = self.formats.setting
        self.index = StepIndex(self.store)
        self._index_lock = threading.RLock()  # the background writer updates the index too
        self._protocol = protocol_for(self.store)
        self._staging = StagingBuffers()
        self._reclaimer = Background("ckptmgr-reclaim")  # frees deleted steps' space
        self._writer = Background(f"ckptmgr-writer:{os.path.basename(self.directory) or self.directory}")
        # A background save agrees with the other ranks while the training loop runs its
        # own collectives. Two threads must never share a process group, so async saves
        # get a private gloo group (created here: constructing the manager is collective).
        self._async_group = dist.new_control_group() if self.async_save and dist.get_world_size() > 1 else None
        self._restored_step: Optional[int] = None
        self._owner = DirectoryOwner(self.store)  # claimed at the first save, never by reads
        self._closed = False
        self._tidied = False  # the first save lists the directory and removes leftovers

    # ------------------------------------------------------------------ listing

    def _step_uri(self, step: int) -> str:
        return self.store.uri(step_name(step))

    def all_steps(self) -> List[int]:
        """Committed steps (manifest present and self-consistent), oldest first.

        One directory listing per call; manifests are read once per step and
        cached. Not a collective: any rank may call it (only ``save`` and
        ``restore`` must be called on every rank).
        """
        with self._index_lock:
            return list(self.index.refresh())

    def latest_step(self) -> Optional[int]:
        """The highest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The committed step with the best ``best_metric`` (ties: the newer), or None."""
        if not self.best_metric:
            return None
        with self._index_lock:
            infos = list(self.index.refresh().values())
        ranked = best_of(infos, self.best_metric, self.best_mode)
        return ranked[0] if ranked else None

    # ------------------------------------------------------------------ save

    def save(self, step: int, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, extra: Optional[Mapping[str, Any]] = None,
             metrics: Optional[Mapping[str, Any]] = None, meta: Optional[Mapping[str, Any]] = None,
             force: bool = False) -> str:
        """Write a checkpoint for ``step`` and commit it; then apply retention.

        Retention uncommits the steps it drops before ``save`` returns (they
        vanish from every listing at once); freeing their files' space runs in
        the background and is finished by the next ``save`` or :meth:`close`.

        Args:
            step: Training step (int >= 0); the directory is ``step_%08d``.
            model: The model, wrapped (DDP, DataParallel, compiled, accelerate) or not.
            optimizer: An optimizer or a dict name -> optimizer.
            scheduler: An LR scheduler or a dict name -> scheduler.
            scaler: A ``torch.amp.GradScaler`` (or a dict of them).
            extra: Your state: JSON-like values, tensors, or objects with
                ``state_dict()``/``load_state_dict()``.
            metrics: Numbers recorded in the manifest (for ``best_metric``).
            meta: Your metadata, stored under ``meta['user']``.
            force: Replace a committed checkpoint of the same step. The old one
                stays committed until the new one is complete (see :mod:`ckptmgr.step.commit`).

        Returns:
            URI of the committed step directory.

        Raises:
            CheckpointExistsError: ``step`` is committed and ``force`` is False.
            UnserializableStateError: some state cannot be stored without pickle.
            StorageError: writing failed; nothing new is committed.
            DistributedError: another rank failed or timed out; nothing is committed.
        """
        self._check_open()
        step = check_index("step", step)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        objs = TrainingObjects(model, optimizer, scheduler, scaler, extra)
        fmt = self.formats.for_save(model)
        if not self.async_save:
            snapshot, error = self._collect(fmt, step, objs, metrics, meta, stage=False)
            return self._write_and_commit(fmt, snapshot, error, force, group=None)
        self._writer.wait()  # back-pressure: one save in flight; raises the previous save's error
        snapshot, error = self._collect(fmt, step, objs, metrics, meta, stage=True)
        if error is not None and dist.get_world_size() == 1:
            raise error  # nobody else to tell: fail right here
        self._writer.submit(lambda: self._write_and_commit(fmt, snapshot, error, force, group=self._async_group),
                            what=f"checkpoint step {step}")
        return self._step_uri(step)

    def _collect(self, fmt: StepFormat, step: int, objs: TrainingObjects, metrics: Any, meta: Any,
                 stage: bool) -> Tuple[Snapshot, Optional[Exception]]:
        """Gather this rank's state; an error is returned, not raised, so every rank can learn of it."""
        try:
            snapshot = fmt.collect(step, objs, metrics, meta, dist.get_rank(), dist.get_world_size())
            # async: copy into reused CPU buffers; the training loop may change the originals now
            return (fmt.stage(snapshot, self._staging) if stage else snapshot), None
        except Exception as exc:
            return Snapshot(step, {}), exc

    def _write_and_commit(self, fmt: StepFormat, snapshot: Snapshot, error: Optional[Exception], force: bool,
                          group: Any) -> str:
        """Write, commit (manifest last), retain: the part an async save runs in the background."""
        final, manifest = save_step(self.store, self._protocol, fmt, snapshot, error=error, force=force,
                                    group=group, before_prepare=self._prepare_directory,
                                    before_commit=self._owner.check, checksum=self.checksum)
        if manifest is not None:  # rank 0
            with self._index_lock:
                self.index.add(snapshot.step, manifest.metrics)
            logger.info("committed checkpoint step %d at %s", snapshot.step, self.store.uri(final))
            fault_point("save.after_rename")
            self._apply_retention(snapshot.step)
        return self.store.uri(final)

    def _prepare_directory(self) -> None:
        """Rank 0, before a save's plan: claim the directory; the first save lists it and removes leftovers.

        Later saves need no listing (a failed save removes what it wrote; the claim keeps other jobs out; the
        index records what this manager commits and deletes), so a save costs the same with 1 or 1000 steps.
        """
        self._reclaimer.wait()  # the previous retention's deletes are finished before we list
        self._owner.claim()  # before cleaning: never tidy away another job's in-flight save
        with self._index_lock:
            if not self._tidied:
                self.index.refresh()
                self._protocol.clean_leftovers(self.index.names, self.index.uncommitted)
                self._tidied = True

    def _apply_retention(self, saved: int) -> None:
        """Uncommit what the policy drops (rank 0, after the commit; failures only logged)."""
        with self._index_lock:
            known = self.index.known()
        protected = {saved}
        if self._restored_step is not None and self._restored_step == max(known):
            protected.add(self._restored_step)
        reclaims = []
        for step in steps_to_delete(list(known.values()), self.policy, protected):
            try:
                reclaims.append(self._protocol.uncommit(step))
            except Exception as exc:  # the new checkpoint is committed; deleting can wait
                logger.warning("retention could not delete step %d: %s", step, exc)
                continue
            with self._index_lock:
                self.index.discard(step)
            logger.info("retention deleted checkpoint step %d", step)
            fault_point("retention.between_deletes")
        if reclaims:
            # The dropped steps are uncommitted already; freeing their blocks can happen
            # after save() returns. The next save (and close) waits for it first.
            self._reclaimer.submit(lambda: run_reclaims(reclaims), what="freeing deleted checkpoints")

    # ------------------------------------------------------------------ restore

    def restore(self, step: Optional[int] = None, *, model: nn.Module, optimizer: Any = None,
                scheduler: Any = None, scaler: Any = None, extra: Optional[Mapping[str, Any]] = None,
                strict: bool = True, verify: bool = True, map_location: MapLocation = None,
                in_place: bool = True) -> Optional[RestoredCheckpoint]:
        """Load a checkpoint into the given objects.

        Every file is checked against the manifest before anything is applied:
        sizes always, checksums with ``verify``. Without a ``step``, the newest
        committed checkpoint that checks out is used; damaged newer ones are
        skipped with a warning. The RNG streams (Python, NumPy, torch, CUDA) are
        set to the saved ones too, so training continues exactly. Under
        torch.distributed every rank must call it: rank 0 picks the step, every
        rank loads it, and its own RNG state.

        Args:
            step: Step to restore; None for the latest good one.
            model: Model to load the weights into (wrapped or not).
            optimizer, scheduler, scaler: As passed to :meth:`save` (same names for dicts).
            extra: Objects with ``load_state_dict`` to restore by key.
            strict: Model keys and shapes must match exactly, and every object
                passed must have saved state.
            verify: Check the checksum of every file (sizes are always checked).
            map_location: Where to put loaded tensors (as for ``torch.load``).
            in_place: Read weights and optimizer state straight into the
                model's and optimizer's existing CPU tensors (no second copy of
                the state in memory). If a file then fails verification, those
                tensors hold partial data: the latest-step fallback overwrites
                them with an older step, and an explicit ``step`` raises, so do
                not train on after a failed restore. Pass False to leave them
                untouched until every file has checked out.

        Returns:
            A :class:`RestoredCheckpoint`, or None when nothing is committed.

        Raises:
            CheckpointNotFoundError: ``step`` is not committed.
            ChecksumError, CorruptCheckpointError: ``step`` is damaged, or every checkpoint is.
            KeyMismatchError: ``strict`` and the model does not match.
            CheckpointFormatError: an object passed has no saved state (``strict``) or other names.
        """
        self._check_open()
        if step is not None:
            step = check_index("step", step)
        self.wait()  # never read a directory a background save is still writing
        objs = TrainingObjects(model, optimizer, scheduler, scaler, extra)

        def candidates() -> List[int]:
            with self._index_lock:
                return list(self.index.refresh())
        found = agree_on_step(self.store, self.formats, objs, step, candidates, verify=verify,
                              map_location=map_location, in_place=in_place and map_location in (None, "cpu"))
        if found is None:
            return None
        chosen, fmt, loaded = found
        values: Dict[str, Any] = {}
        step_store = self.store.sub(step_name(chosen))
        agree(f"restoring step {chosen} from {self.directory} (apply)",
              lambda: values.update(fmt.apply(loaded, step_store, objs, strict)))
        self._restored_step = chosen
        return RestoredCheckpoint(step=chosen, extra=values, meta=plain(loaded.get("meta") or {}),
                                  metrics=dict(loaded.manifest.metrics), path=self._step_uri(chosen))

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed", "create a new one")

    def wait(self) -> None:
        """Block until the pending async save (if any) is committed and retention applied.

        Space of the steps retention dropped may still be being freed; the next
        ``save`` and :meth:`close` wait for that too.

        Raises:
            CheckpointError, StorageError, DistributedError, ...: what the background save raised.
        """
        self._writer.wait()

    def close(self) -> None:
        """Wait for pending work and free the staging buffers; the manager cannot save or restore afterwards.

        Raises:
            Whatever a pending background save raised (the manager is closed all the same).
        """
        if self._closed:
            return
        try:
            self._writer.close()
            self._reclaimer.close()
        finally:
            self._closed = True
            self._staging.release()
            self.formats.release()
            self._owner.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, policy={self.policy})"


def resume_from_latest(directory: Any, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
                       scaler: Any = None, **kwargs: Any) -> int:
    """Restore the latest good checkpoint of ``directory`` and return the step to continue from.

    Args:
        directory: A manager directory (local path or URL).
        model, optimizer, scheduler, scaler: Objects to restore.
        **kwargs: ``extra``, ``strict``, ``verify``, ``map_location`` (see
            :meth:`CheckpointManager.restore`) and ``storage_options``.

    Returns:
        Restored step + 1, or 0 when nothing is committed yet.
    """
    options = kwargs.pop("storage_options", None)
    with CheckpointManager(directory, max_to_keep=None, storage_options=options) as manager:
        restored = manager.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, **kwargs)
    return 0 if restored is None else restored.step + 1
