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

from . import distributed as dist
from .advice import SaveAdvice
from .errors import CheckpointError
from .faults import fault_point
from .format.maplocation import MapLocation
from .format.signing import load_key, signed_checksum
from .io.access import open_store
from .io.store import Options, Store
from .keeping import Keeping
from .restoring import restore_step
from .retention import DEFAULT_MAX_TO_KEEP, kept_summary, steps_to_delete, uncommit_dropped
from .state.models import ModelArg, check_model
from .state.objects import check_index
from .state.partial import Exclusion
from .state.staging import StagingBuffers
from .step.background import Background, finish_before_interrupt
from .step.commit import protocol_for, run_reclaims
from .step.formats import Formats, StepFormat
from .step.index import StepIndex
from .step.names import step_name
from .step.ownership import DirectoryOwner
from .step.progress import measure
from .step.rankstate import check_policy
from .step.records import RestoredCheckpoint, Snapshot, TrainingObjects
from .step.save import save_step
from .step.tiers import Persistent, TieredSteps
from .warmstart import DEFAULT_REVISE_KEYS, WarmStart

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "RestoredCheckpoint"]


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
    timeout of :func:`ckptmgr.distributed.default_timeout`). A local directory must
    be on a filesystem every node shares; with node-local disks, add ``local_dir``.

    One manager (one job) writes to a directory at a time: its first save removes the temporary directories
    that crashed saves left there, and its listing cache assumes nobody else commits or deletes steps meanwhile.

    Args:
        directory: Local path or fsspec URL (``s3://bucket/run1``).
        max_to_keep: Keep this many newest checkpoints (None: keep all). Given no retention argument at all, a
            manager keeps by the settings recorded with the run (see :mod:`ckptmgr.keeping`), else 5.
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
        sharded: ``'auto'`` (default): a model wrapped by FSDP1 or FSDP2 or
            holding DTensors (tensor parallel) is saved sharded; True: always;
            False: never (an error for FSDP). Sharded saves write model and optimizer state
            from every rank with torch.distributed.checkpoint (see
            :mod:`ckptmgr.sharded`), inside the same commit protocol; restore
            reshards to any number of ranks. Its metadata is a pickle, read only
            with an allowlist unpickler (:mod:`ckptmgr.sharded.safe_pickle`).
        save_frozen: False: plain saves hold only parameters with ``requires_grad=True`` and buffers; the
            manifest records the names and shapes left out, and restore checks the model's against them.
        init_from, init_revise_keys: Warm start (:mod:`ckptmgr.warmstart`): while nothing is committed, ``restore``
            loads the model weights from this URI (keys renamed by the rules; mismatches logged) and returns None.
        signing_key: Sign every manifest (HMAC-SHA256, files checksummed with
            sha256), and restore only steps signed with this key: bytes, or a key
            file path; None: ``CKPTMGR_SIGNING_KEY`` if set; False: no key.
        local_dir, local_max_to_keep: A path on each node's own disk where saves commit first (then upload to
            ``directory``), and the local copies of persistent steps each node keeps (:mod:`ckptmgr.step.tiers`).
        checksum: Per-file checksum, verified on restore: ``'xxh3'`` (XXH3-128, at memory speed; the default
            without a signing key) or ``'sha256'`` (as ckptmgr 0.1; always with a signing key). Restores use the
            one a manifest names.

    Raises:
        ValueError: an argument is out of range (see :func:`ckptmgr.retention.build_policy`), the key is
            short, or ``checksum`` is not ``'xxh3'`` or ``'sha256'`` (or not sha256 with a signing key).
        UnknownSchemeError: ``directory`` is a URL of a protocol fsspec does not know.
    """

    def __init__(self, directory: Any, max_to_keep: Optional[int] = DEFAULT_MAX_TO_KEEP,
                 keep_every_n_steps: Optional[int] = None,
                 best_metric: Optional[str] = None, best_mode: str = "min", keep_best: int = 0,
                 async_save: bool = False, storage_options: Options = None, sharded: Any = "auto",
                 save_frozen: bool = True, init_from: Any = None, init_revise_keys: Any = DEFAULT_REVISE_KEYS,
                 signing_key: Any = None, local_dir: Any = None, local_max_to_keep: int = 1,
                 checksum: Optional[str] = None) -> None:
        self.store: Store = open_store(os.fspath(directory), storage_options)
        self.directory: str = self.store.root
        self._advice = SaveAdvice(self.store.root)
        self.storage_options, self.async_save = storage_options, bool(async_save)
        self.formats = Formats(sharded, save_frozen)
        self.init_from = None if init_from is None else WarmStart.of(init_from, init_revise_keys, storage_options)
        self.signing_key = load_key(signing_key)
        self.checksum = signed_checksum(checksum, self.signing_key is not None)
        if self.signing_key is not None and local_dir is not None:
            raise ValueError("signing_key and local_dir cannot be used together yet (tiered steps are not signed); "
                             "drop one of them (unset CKPTMGR_SIGNING_KEY for a tiered run)")
        self.sharded = self.formats.setting
        self.index = StepIndex(self.store)
        self._index_lock = threading.RLock()  # the background writer updates the index too
        self.keeping = Keeping(self.index, self._index_lock, self.directory, max_to_keep, keep_every_n_steps,
                               best_metric, best_mode, keep_best)
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
        self._tiers = None if local_dir is None else TieredSteps(Persistent(  # constructing it is a collective
            self.store, self._protocol, self.index, self._index_lock, self._owner, self._prepare_directory,
            lambda infos, protected=(): steps_to_delete(infos, self.keeping.policy, protected), self._reclaimer,
            self.checksum), local_dir, local_max_to_keep)

    # ------------------------------------------------------------------ listing

    def _step_uri(self, step: int) -> str:
        return self.store.uri(step_name(step))

    def all_steps(self) -> List[int]:
        """Committed steps (manifest present and self-consistent), oldest first.

        One listing per call; manifests are read once per step and cached. Not a collective: any rank may call it.
        """
        with self._index_lock:
            steps = list(self.index.refresh())
        return self._tiers.restorable(steps) if self._tiers else steps

    def latest_step(self) -> Optional[int]:
        """The highest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    policy = property(lambda self: self.keeping.policy, doc="The retention rules in force (see :attr:`keeping`).")
    best_metric = property(lambda self: self.keeping.settings.best_metric, doc="The metric ranking checkpoints.")

    def best_step(self) -> Optional[int]:
        """The committed step with the best ``best_metric`` (ties: the newer), or None."""
        return self.keeping.best_step()

    # ------------------------------------------------------------------ save

    def save(self, step: int, *, model: ModelArg, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, extra: Optional[Mapping[str, Any]] = None,
             metrics: Optional[Mapping[str, Any]] = None, meta: Optional[Mapping[str, Any]] = None,
             force: bool = False, rank_state: Any = None) -> str:
        """Write a checkpoint for ``step`` and commit it; then apply retention.

        Retention uncommits the steps it drops before ``save`` returns (they vanish from every listing at
        once); freeing their files' space runs in the background, finished by the next ``save`` or :meth:`close`.

        Args:
            step: Training step (int >= 0); the directory is ``step_%08d``.
            model: The model, wrapped (DDP, DataParallel, compiled, accelerate, FSDP) or not; or a dict
                name -> model (``{"generator": G, "discriminator": D}``), each saved in its own file.
            optimizer: An optimizer (``ZeroRedundancyOptimizer`` included) or a dict name -> optimizer.
            scheduler: An LR scheduler or a dict name -> scheduler.
            scaler: A ``torch.amp.GradScaler`` (or a dict of them).
            extra: Your state: JSON-like values, tensors, or objects with
                ``state_dict()``/``load_state_dict()``.
            metrics: Numbers recorded in the manifest (for ``best_metric``).
            meta: Your metadata, stored under ``meta['user']``.
            force: Replace a committed checkpoint of the same step. The old one
                stays committed until the new one is complete (see :mod:`ckptmgr.step.commit`).
            rank_state: This rank's own state (each rank writes its own file): a dict name ->
                stateful object (a data loader), JSON-like value, tensors, or a callable returning one.

        Returns:
            URI of the committed step directory (with ``local_dir``: this node's local copy).

        Raises:
            CheckpointExistsError: ``step`` is committed and ``force`` is False.
            UnserializableStateError: some state cannot be stored without pickle.
            StorageError: writing failed; nothing new is committed.
            DistributedError: another rank failed or timed out; nothing is committed.
        """
        self._check_open()
        step = check_index("step", step)
        objs = TrainingObjects(check_model(model), optimizer, scheduler, scaler, extra, rank_state)
        fmt = self.formats.for_save(model)
        self._advice.before_save(model, metrics, self.keeping.known.best_metric, self.keeping.known.keep_best)
        if not self.async_save:
            snapshot, error = self._collect(fmt, step, objs, metrics, meta, stage=False)
            with finish_before_interrupt(f"checkpoint step {step}"):  # Ctrl-C: commit first, then stop
                return self._write_and_commit(fmt, snapshot, error, force, group=None, bar=dist.get_rank() == 0)
        self._writer.wait()  # back-pressure: one save in flight; raises the previous save's error
        snapshot, error = self._collect(fmt, step, objs, metrics, meta, stage=True)
        if error is not None and dist.get_world_size() == 1:
            raise error  # nobody else to tell: fail right here
        self._writer.submit(lambda: self._write_and_commit(fmt, snapshot, error, force, group=self._async_group),
                            what=f"checkpoint step {step}")
        return self._tiers.local.uri(step_name(step)) if self._tiers else self._step_uri(step)

    def _collect(self, fmt: StepFormat, step: int, objs: TrainingObjects, metrics: Any, meta: Any,
                 stage: bool) -> Tuple[Snapshot, Optional[Exception]]:
        """Gather this rank's state; an error is returned, not raised, so every rank can learn of it."""
        try:
            leader = self._tiers.layout.is_leader if self._tiers else None  # tiered: every node's first rank
            snapshot = fmt.collect(step, objs, metrics, meta, dist.get_rank(), dist.get_world_size(), leader)
            # async: copy into reused CPU buffers; the training loop may change the originals now
            return (fmt.stage(snapshot, self._staging) if stage else snapshot), None
        except Exception as exc:
            return Snapshot(step=step, rng={}), exc

    def _write_and_commit(self, fmt: StepFormat, snapshot: Snapshot, error: Optional[Exception], force: bool,
                          group: Any, bar: bool = False) -> str:
        """Write, commit (manifest last), retain: the part an async save runs in the background."""
        if self._tiers:
            return self._tiers.save(fmt, snapshot, error, force, group)
        with measure(f"saving step {snapshot.step}", bar=bar) as measured:
            final, manifest = save_step(self.store, self._protocol, fmt, snapshot, error=error, force=force,
                                        group=group, before_prepare=lambda: self._prepare_directory(snapshot.step),
                                        before_commit=self._owner.check, signing_key=self.signing_key,
                                        retention=self.keeping.record, checksum=self.checksum)
        if manifest is not None:  # rank 0
            with self._index_lock:
                self.index.add(snapshot.step, manifest.metrics, manifest.time, manifest.retention)
            logger.info("committed checkpoint step %d at %s: %s", snapshot.step, self.store.uri(final),
                        measured.summary(sum(e.size for e in manifest.files.values())))
            fault_point("save.after_rename")
            self._apply_retention(snapshot.step)
        return self.store.uri(final)

    def _prepare_directory(self, step: Optional[int] = None) -> None:
        """Rank 0, before a save's plan: claim the directory; the first save lists it and removes leftovers.

        Later saves list only after a removal failed (``protocol.leftovers``; the claim keeps other jobs out, the
        index records commits and deletes), so a save costs the same with 1 or 1000 steps. ``step``'s own
        leftovers stay: another job may be about to commit it (see :mod:`ckptmgr.step.commit`)."""
        self._reclaimer.wait()  # the previous retention's deletes are finished before we list
        self._owner.claim()  # before cleaning: never tidy away another job's in-flight save
        with self._index_lock:
            if self._protocol.leftovers:  # at the first save, and after a removal failed
                self._protocol.leftovers = False
                self.index.refresh()
                self._protocol.clean_leftovers(self.index.names, [s for s in self.index.uncommitted if s != step])
        self.keeping.resolve()  # the first save decides the retention settings from this listing
        if step is not None:
            self._advice.step_order(step, max(self.index.known(), default=None))

    def _apply_retention(self, saved: int) -> None:
        """Uncommit what the policy drops (rank 0, after the commit); free their space in the background."""
        policy = self.keeping.policy
        reclaims = uncommit_dropped(self.index, self._index_lock, policy, saved, self._restored_step, self._protocol)
        if reclaims:
            with self._index_lock:
                logger.info("retention keeps %s", kept_summary(policy, list(self.index.known().values())))
            # The dropped steps are uncommitted already; freeing their blocks can wait (the next save/close waits)
            self._reclaimer.submit(lambda: run_reclaims(reclaims), what="deleting the checkpoints retention dropped")

    # ------------------------------------------------------------------ restore

    def restore(self, step: Optional[int] = None, *, model: ModelArg, optimizer: Any = None,
                scheduler: Any = None, scaler: Any = None, extra: Optional[Mapping[str, Any]] = None,
                strict: bool = True, verify: bool = True, map_location: MapLocation = None,
                in_place: bool = True, exclude: Any = (), rank_state: Any = None,
                on_world_size_change: str = "error", rng: bool = True) -> Optional[RestoredCheckpoint]:
        """Load a checkpoint into the given objects.

        Every file is checked against the manifest before anything is applied:
        sizes always, checksums with ``verify``. Without a ``step``, the newest
        committed checkpoint that checks out is used; damaged newer ones are
        skipped with a warning. The RNG streams (Python, NumPy, torch, CUDA) are
        set to the saved ones too, so training continues exactly. Under
        torch.distributed every rank must call it: rank 0 picks the step, every
        rank loads it, its own RNG state (if it has one) and its own rank state.

        Args:
            step: Step to restore; None for the latest good one.
            model: Model to load the weights into (wrapped or not), or a dict name -> model as passed to save.
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
                untouched until every file has checked out. Either way, what needs no tensor data (keys and
                shapes, optimizer and scheduler classes, param groups) is checked before anything is touched.
            exclude: Component names (``'optimizer'``, ``'rng'``, ...) and model-key patterns (``'re:^head\\.'``)
                to leave untouched, logged at INFO (see :class:`ckptmgr.state.partial.Exclusion`).
            rank_state: This rank's objects for its saved rank state (a dict, or a
                callable returning one); saved values are in ``RestoredCheckpoint.rank_state``.
            on_world_size_change: ``'error'``: a step with rank state of another world size raises
                WorldSizeChangedError before anything is loaded; ``'skip'``: restore the rest, warn.
            rng: Set the process's RNG streams to the saved ones (False leaves them, e.g. to evaluate mid-run).

        Returns:
            A :class:`RestoredCheckpoint`, or None when nothing is committed (after a warm start from ``init_from``).

        Raises:
            WorldSizeChangedError: see ``on_world_size_change``.
            CheckpointNotFoundError: ``step`` is not committed.
            ChecksumError, CorruptCheckpointError: ``step`` is damaged, or every checkpoint is.
            SignatureError: a key is set and ``step`` (or every step) is not signed with it.
            KeyMismatchError: ``strict`` and the model does not match (FrozenParametersError: its frozen part).
            CheckpointFormatError: an object passed has no saved state (``strict``) or other names.
        """
        self._check_open()
        step = None if step is None else check_index("step", step)
        policy = check_policy(on_world_size_change)
        self.wait()  # never read a directory a background save is still writing
        objs = TrainingObjects(check_model(model), optimizer, scheduler, scaler, extra, rank_state,
                               exclude=Exclusion.parse(exclude))
        opts: Dict[str, Any] = {"verify": verify, "map_location": map_location, "on_world_size_change": policy,
                                "in_place": in_place and map_location in (None, "cpu"), "strict": strict}
        return restore_step(self, objs, step, strict=strict, rng=rng, opts=opts)

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed", "create a new one")

    def wait(self) -> None:
        """Block until the pending async save (if any) is committed (and uploaded) and retention applied.

        Space of the steps retention dropped may still be being freed; the next ``save`` and :meth:`close` wait.

        Raises:
            CheckpointError, StorageError, DistributedError, ...: what the background save raised.
        """
        self._writer.wait()
        if self._tiers:
            self._tiers.wait()

    def close(self) -> None:
        """Wait for pending work and free the staging buffers; the manager cannot save or restore afterwards.

        Raises:
            Whatever a pending background save raised (the manager is closed all the same).
        """
        if self._closed:
            return
        try:
            self._writer.close()
            if self._tiers:
                self._tiers.close()
            self._reclaimer.close()
        finally:
            self._closed = True
            self._staging.release()
            self.formats.release()
            self._owner.release()
            if self._tiers:
                self._tiers.release()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, retention={self.keeping.describe()!r})"
