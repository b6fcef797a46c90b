"""CheckpointManager: rotating, atomically committed, verified checkpoints, and resume.

This module only orchestrates: :mod:`ckptmgr.state` turns training objects
into storable trees, :mod:`ckptmgr.components` writes and reads the files of a
step, :mod:`ckptmgr.stepdir` commits and deletes step directories,
:mod:`ckptmgr.manifest` defines the commit record, :mod:`ckptmgr.retention`
decides what to delete, and :mod:`ckptmgr.agreement` makes one rank's failure
every rank's. What lives here is the order of those steps: collect, write,
commit (manifest last), retain; and choose, read, apply.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

from . import components, dist, state, stepdir, storage
from . import sharded as shards
from .agreement import agree
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, DistributedError
from .faults import fault_point
from .index import StepIndex
from .manifest import Manifest, step_name
from .ownership import DirectoryOwner
from .retention import best_of, build_policy, steps_to_delete
from .serialization import MapLocation
from .snapshot import BackgroundWriter, StagingBuffers

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "RestoredCheckpoint", "resume_from_latest"]


@dataclass
class RestoredCheckpoint:
    """What :meth:`CheckpointManager.restore` loaded.

    Attributes:
        step: The restored step.
        extra: The saved ``extra`` values (objects passed in ``extra`` that have
            ``load_state_dict`` are returned as themselves, loaded).
        meta: The checkpoint's meta: versions, time, world size, and ``'user'``.
        metrics: The metrics given to ``save``.
        path: URI of the step directory.
    """

    step: int
    extra: Dict[str, Any] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    path: str = ""


class CheckpointManager:
    """Saves, rotates and restores complete training checkpoints in one directory.

    Each ``save`` writes ``step_00000100/`` holding ``model.safetensors`` (bare
    model keys), ``optimizer``/``scheduler``/``scaler``/``extra`` files (JSON, or
    safetensors with the JSON structure in the header when they hold tensors),
    ``meta.json``, one ``rng-rank00000.safetensors`` per rank, and, last,
    ``manifest.json`` with every file's size and sha256: the commit. Nothing is
    ever unpickled.

    Under ``torch.distributed`` every rank calls ``save``/``restore`` with the
    same arguments: rank 0 writes the replicated state, every rank its RNG file,
    and ranks agree on the outcome (errors on any rank raise on all, with the
    timeout of :func:`ckptmgr.dist.default_timeout`). For a local directory,
    rank 0 creates the temporary directory and the other ranks write into it,
    so a local path must be on a filesystem shared by all nodes; on separate
    node-local disks use an object store (``s3://...``) instead.

    One manager (one job) writes to a directory at a time: a save removes the
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

    Raises:
        ValueError: an argument is out of range (see :func:`ckptmgr.retention.build_policy`).
    """

    def __init__(self, directory: Any, max_to_keep: Optional[int] = 5, keep_every_n_steps: Optional[int] = None,
                 best_metric: Optional[str] = None, best_mode: str = "min", keep_best: int = 0,
                 async_save: bool = False, storage_options: Optional[Dict[str, Any]] = None,
                 sharded: Any = "auto") -> None:
        directory = os.fspath(directory)
        if storage.is_local(directory):
            directory = os.path.abspath(storage.local_path(directory))
        elif directory.endswith("/") and not directory.endswith("://"):
            directory = directory.rstrip("/")
        self.directory: str = directory
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.policy = build_policy(max_to_keep, keep_every_n_steps, best_metric, best_mode, keep_best)
        self.storage_options = storage_options
        self.async_save = bool(async_save)
        self.index = StepIndex(directory, storage_options)
        self._index_lock = threading.RLock()  # the background writer updates the index too
        self._staging = StagingBuffers()
        self.sharded = shards.check_setting(sharded)
        self._dcp_staging = shards.Stager()
        self._reclaimer = BackgroundWriter(name="ckptmgr-reclaim")  # frees deleted steps' space
        self._writer = BackgroundWriter(name=f"ckptmgr-writer:{os.path.basename(directory) or directory}")
        # A background save agrees with the other ranks while the training loop runs its
        # own collectives. Two threads must never share a process group, so async saves
        # get a private gloo group (created here: constructing the manager is collective).
        self._async_group = dist.new_control_group() if self.async_save and dist.get_world_size() > 1 else None
        self._restored_step: Optional[int] = None
        self._owner = DirectoryOwner(directory, storage_options)  # claimed at the first save, never by reads
        self._closed = False

    # ------------------------------------------------------------------ listing

    def _step_uri(self, step: int) -> str:
        return storage.join(self.directory, step_name(step))

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
                stays committed until the new one is complete (see :mod:`ckptmgr.stepdir`).

        Returns:
            URI of the committed step directory.

        Raises:
            CheckpointExistsError: ``step`` is committed and ``force`` is False.
            UnserializableStateError: some state cannot be stored without pickle.
            StorageError: writing failed; nothing new is committed.
            DistributedError: another rank failed or timed out; nothing is committed.
        """
        self._check_open()
        step = state.check_index("step", step)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        args = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, extra=extra,
                    metrics=metrics, meta=meta)
        if not self.async_save:
            snapshot, error = self._collect_or_error(step, args, stage=False)
            return self._write_and_commit(step, snapshot, error, force, group=None)
        self._writer.wait()  # back-pressure: one save in flight; raises the previous save's error
        snapshot, error = self._collect_or_error(step, args, stage=True)
        if error is not None and dist.get_world_size() == 1:
            raise error  # nobody else to tell: fail right here
        self._writer.submit(lambda: self._write_and_commit(step, snapshot, error, force, group=self._async_group))
        return self._step_uri(step)

    def _collect_or_error(self, step: int, args: Mapping[str, Any],
                          stage: bool) -> Tuple[Dict[str, Any], Optional[Exception]]:
        """Gather this rank's state; an error is returned, not raised, so every rank can learn of it."""
        try:
            if shards.use_sharded(self.sharded, args["model"]):  # model and optimizer through DCP, every rank
                snapshot = shards.collect(step, **args)
                return (self._dcp_staging.stage(snapshot, self._staging) if stage else snapshot), None
            snapshot = state.collect(step, **args)
            if stage:  # async: copy into reused CPU buffers; the training loop may change the originals now
                snapshot = self._staging.stage_tree(snapshot)
            return snapshot, None
        except Exception as exc:
            return {}, exc

    def _write_and_commit(self, step: int, snapshot: Dict[str, Any], error: Optional[Exception], force: bool,
                          group: Any) -> str:
        """Prepare, write, commit (manifest last), retain: the part an async save runs in the background.

        Every phase is agreed across ranks (on ``group``), so an error on any
        rank, including ``error`` from collecting, raises on all of them and
        nothing is committed.
        """
        rank, world = dist.get_rank(), dist.get_world_size()
        what = f"saving step {step} to {self.directory}"
        plan: Optional[stepdir.WritePlan] = None

        def prepare() -> Dict[str, Any]:
            nonlocal plan
            if error is not None:
                raise error
            fault_point("save.prepare")
            if rank != 0:
                return {"step": step}
            self._reclaimer.wait()  # the previous retention's deletes are finished before we list
            self._owner.claim()  # before cleaning: never tidy away another job's in-flight save
            with self._index_lock:
                self.index.refresh()
                stepdir.clean_leftovers(self.directory, self.index.names, self.index.uncommitted,
                                        self.storage_options)
            plan = stepdir.prepare(self.directory, step, force, self.storage_options)
            return {"step": step, "plan": plan.to_json()}

        committed = False
        try:
            replies = agree(f"{what} (prepare)", prepare, group)
            if len({r["step"] for r in replies}) != 1:
                raise DistributedError(f"{what}: ranks passed different steps {[r['step'] for r in replies]}",
                                       "call save() with the same step on every rank")
            plan = stepdir.WritePlan(**replies[0]["plan"])

            def write() -> Dict[str, Any]:
                fault_point("save.write")
                if "dcp" in snapshot:  # sharded: dcp.save on every rank (a collective on group), then the rest
                    return shards.write_rank_files(plan, snapshot, rank, self.storage_options, group)
                return components.write_rank_files(plan.root, plan.prefix, snapshot, rank, self.storage_options)
            written = agree(f"{what} (write)", write, group)
            manifest: List[Manifest] = []

            def commit() -> None:
                nonlocal committed
                fault_point("save.commit")
                if rank == 0:
                    manifest.append(components.build_manifest(step, snapshot["metrics"], written, world))
                    self._owner.check()  # an object-store lease taken over by another job: do not commit
                    stepdir.commit(plan, manifest[0], self.storage_options)
                    committed = True
            agree(f"{what} (commit)", commit, group)
            committed = True
        finally:
            if not committed and rank == 0 and plan is not None:  # never undo a commit that happened
                stepdir.abort(plan, self.storage_options)
        if rank == 0:
            with self._index_lock:
                self.index.add(step, manifest[0].metrics)
            logger.info("committed checkpoint step %d at %s", step, plan.final)
            fault_point("save.after_rename")
            self._apply_retention(step)
        return plan.final

    def _apply_retention(self, saved: int) -> None:
        """Delete what the policy drops (rank 0, after the commit; failures only logged)."""
        with self._index_lock:
            known = self.index.known()
        protected = {saved}
        if self._restored_step is not None and self._restored_step == max(known):
            protected.add(self._restored_step)
        reclaims: List[Any] = []
        for step in steps_to_delete(list(known.values()), self.policy, protected):
            try:
                stepdir.delete_step(self.directory, step, self.storage_options, defer=reclaims.append)
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
            self._reclaimer.submit(lambda: stepdir.reclaim_all(reclaims))

    # ------------------------------------------------------------------ restore

    def restore(self, step: Optional[int] = None, *, model: nn.Module, optimizer: Any = None,
                scheduler: Any = None, scaler: Any = None, extra: Optional[Mapping[str, Any]] = None,
                strict: bool = True, verify: bool = True, map_location: MapLocation = None,
                in_place: bool = True) -> Optional[RestoredCheckpoint]:
        """Load a checkpoint into the given objects.

        Every file is checked against the manifest before anything is applied:
        sizes always, sha256 with ``verify``. Without a ``step``, the newest
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
            verify: Check sha256 of every file (sizes are always checked).
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
            step = state.check_index("step", step)
        self.wait()  # never read a directory a background save is still writing
        rank = dist.get_rank()
        loaded: Dict[str, Any] = {}
        into = state.inplace_targets(model, optimizer) if in_place and map_location in (None, "cpu") else None

        def choose() -> Optional[int]:
            if rank != 0:
                return None
            chosen, payload = self._choose(step, verify, map_location, into)
            loaded.update(payload or {})
            return chosen
        chosen = agree(f"restoring from {self.directory} (choose)", choose)[0]
        if chosen is None:
            return None
        what = f"restoring step {chosen} from {self.directory}"
        if rank != 0:
            agree(f"{what} (read)", lambda: loaded.update(components.read_step(
                self.directory, chosen, rank, verify, map_location, self.storage_options, into=into)))
        else:
            agree(f"{what} (read)", lambda: None)
        values: Dict[str, Any] = {}
        if shards.is_sharded(loaded["manifest"]):
            # DCP loads on every rank (a collective), resharding to this job's layout
            agree(f"{what} (apply)", lambda: values.update(shards.apply_loaded(
                loaded, self._step_uri(chosen), model, optimizer, scheduler, scaler, extra, strict,
                self.storage_options)))
        else:
            agree(f"{what} (apply)", lambda: values.update(state.apply_loaded(loaded, model, optimizer, scheduler,
                                                                              scaler, extra, strict)))
        self._restored_step = chosen
        manifest: Manifest = loaded["manifest"]
        return RestoredCheckpoint(step=chosen, extra=values, meta=state.plain(loaded.get("meta") or {}),
                                  metrics=dict(manifest.metrics), path=self._step_uri(chosen))

    def _choose(self, step: Optional[int], verify: bool, map_location: MapLocation,
                into: Optional[Dict[str, Any]]) -> Tuple[Optional[int], Optional[Dict[str, Any]]]:
        """Rank 0: the step to restore and its loaded files (falling back past damaged ones)."""
        def read(candidate: int) -> Dict[str, Any]:
            return components.read_step(self.directory, candidate, 0, verify, map_location, self.storage_options,
                                        check_all=True, into=into)
        if step is not None:
            return step, read(step)
        with self._index_lock:
            candidates = sorted(self.index.refresh(), reverse=True)
        failures = []
        for candidate in candidates:
            try:
                return candidate, read(candidate)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                logger.warning("checkpoint step %d is damaged, trying an older one: %s", candidate, exc)
                failures.append(f"step {candidate}: {exc}")
        if failures:
            raise CorruptCheckpointError(f"every checkpoint in {self.directory} is damaged:\n" + "\n".join(failures))
        return None, None

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
            self.wait()
            self._reclaimer.wait()
        finally:
            self._closed = True
            self._staging.release()
            self._dcp_staging.release()
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
