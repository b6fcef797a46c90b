"""CheckpointManager: rotating, atomically committed, verified checkpoints, and resume.

This module only orchestrates: :mod:`ckptmgr.state` turns training objects
into storable trees, :mod:`ckptmgr.stepdir` writes, commits and deletes step
directories, :mod:`ckptmgr.manifest` defines the commit record, and
:mod:`ckptmgr.retention` decides what to delete. What lives here is the order
of those steps and the agreement between ranks, so one failing rank turns into
an error on every rank instead of a hang or a half-written checkpoint.
"""
from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional

from torch import nn

from . import dist, errors, state, stepdir, storage
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, DistributedError)
from .manifest import MANIFEST_NAME, FileEntry, Manifest, check_sizes, parse_step_name, step_name, verify_file
from .retention import CheckpointInfo, best_of, build_policy, steps_to_delete
from .serialization import MapLocation

logger = logging.getLogger(__name__)

__all__ = ["CheckpointManager", "RestoredCheckpoint", "resume_from_latest", "load_manager_checkpoint"]

_COMPONENTS = ("optimizer", "scheduler", "scaler", "extra", "meta")


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


def _check_step(step: Any) -> int:
    if isinstance(step, bool):
        raise TypeError("step must be an int, got a bool")
    try:
        value = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int, got {type(step).__name__}") from None
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def _describe(exc: BaseException) -> Dict[str, Any]:
    return {"type": type(exc).__name__, "message": getattr(exc, "message", str(exc)),
            "hint": getattr(exc, "hint", None), "typed": isinstance(exc, CheckpointError)}


def _rebuild(desc: Mapping[str, Any], rank: int, what: str) -> CheckpointError:
    """The error a rank raises for a failure that happened on another rank."""
    cls = getattr(errors, desc["type"], None) if desc.get("typed") else None
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        return cls(f"{what} failed on rank {rank}: {desc['message']}", desc.get("hint"))
    return DistributedError(f"{what} failed on rank {rank}: {desc['type']}: {desc['message']}")


def _agree(what: str, func: Callable[[], Any]) -> List[Any]:
    """Run ``func`` on every rank and return every rank's JSON result, or raise on every rank.

    The rank whose ``func`` raised re-raises its own exception; the others raise
    the same :mod:`ckptmgr.errors` type (or DistributedError) naming that rank.
    Outside torch.distributed this is just ``[func()]``.
    """
    error: Optional[BaseException] = None
    result = None
    try:
        result = func()
    except Exception as exc:  # becomes an error on every rank below
        error = exc
    try:
        replies = dist.all_gather_json({"error": _describe(error) if error else None, "result": result}, what=what)
    except DistributedError:
        if error is not None:
            raise error
        raise
    for rank, reply in enumerate(replies):
        if reply["error"] is not None:
            if error is not None:
                raise error
            raise _rebuild(reply["error"], rank, what)
    return [reply["result"] for reply in replies]


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
        async_save: Accepted for the coming background writer; until then saves
            are synchronous (``save`` returns after the commit either way).
        storage_options: fsspec options (credentials, endpoint) for URLs.

    Raises:
        ValueError: an argument is out of range (see :func:`ckptmgr.retention.build_policy`).
    """

    def __init__(self, directory: Any, max_to_keep: Optional[int] = 5, keep_every_n_steps: Optional[int] = None,
                 best_metric: Optional[str] = None, best_mode: str = "min", keep_best: int = 0,
                 async_save: bool = False, storage_options: Optional[Dict[str, Any]] = None) -> None:
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
        if self.async_save:
            logger.info("async_save=True: saves are synchronous until background saving is available")
        self._known: Dict[int, CheckpointInfo] = {}
        self._uncommitted: List[int] = []
        self._names: List[str] = []
        self._warned: set = set()
        self._restored_step: Optional[int] = None
        self._closed = False
        self.manifest_reads = 0  # manifests parsed by listings so far (listing cost, for tests and logs)

    # ------------------------------------------------------------------ listing

    def _step_uri(self, step: int) -> str:
        return storage.join(self.directory, step_name(step))

    def _scan(self) -> Dict[int, CheckpointInfo]:
        """List the directory once; read manifests only of steps not seen before."""
        self._names = storage.listdir(self.directory, self.storage_options)
        present = {s for s in map(parse_step_name, self._names) if s is not None}
        self._known = {s: info for s, info in self._known.items() if s in present}
        todo = sorted(present - set(self._known))
        self._uncommitted = []
        if todo:
            uris = {s: storage.join(self._step_uri(s), MANIFEST_NAME) for s in todo}
            raw = storage.read_many(list(uris.values()), self.storage_options)
            self.manifest_reads += len(todo)
            for step, uri in uris.items():
                self._learn(step, uri, raw[uri])
        return dict(sorted(self._known.items()))

    def _learn(self, step: int, uri: str, data: Any) -> None:
        if isinstance(data, FileNotFoundError):
            self._uncommitted.append(step)
            return
        try:
            if isinstance(data, BaseException):
                raise data
            manifest = Manifest.from_bytes(data, source=uri)
            if manifest.step != step:
                raise CorruptCheckpointError(f"{uri} records step {manifest.step}")
        except Exception as exc:  # unreadable now: not listed, and said once
            if step not in self._warned:
                self._warned.add(step)
                logger.warning("ignoring checkpoint step %d: %s", step, exc)
            return
        self._known[step] = CheckpointInfo(step, manifest.metrics)

    def all_steps(self) -> List[int]:
        """Committed steps (manifest present and self-consistent), oldest first.

        One directory listing per call; manifests are read once per step and cached.
        """
        return list(self._scan())

    def latest_step(self) -> Optional[int]:
        """The highest committed step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The committed step with the best ``best_metric`` (ties: the newer), or None."""
        if not self.best_metric:
            return None
        ranked = best_of(self._scan().values(), self.best_metric, self.best_mode)
        return ranked[0] if ranked else None

    # ------------------------------------------------------------------ save

    def save(self, step: int, *, model: nn.Module, optimizer: Any = None, scheduler: Any = None,
             scaler: Any = None, extra: Optional[Mapping[str, Any]] = None,
             metrics: Optional[Mapping[str, Any]] = None, meta: Optional[Mapping[str, Any]] = None,
             force: bool = False) -> str:
        """Write a checkpoint for ``step`` and commit it; then apply retention.

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
        step = _check_step(step)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        rank, world = dist.get_rank(), dist.get_world_size()
        what = f"saving step {step} to {self.directory}"
        snapshot: Dict[str, Any] = {}
        plan: Optional[stepdir.WritePlan] = None

        def collect() -> Dict[str, Any]:
            nonlocal plan
            # Synchronous saves write straight from the live tensors; a background
            # writer will copy them here (into staging buffers) instead.
            snapshot["rng"] = state.rng_state(distributed=world > 1)
            if rank != 0:
                return {"step": step}
            snapshot.update(model=state.model_state(model), metrics=state.clean_metrics(metrics),
                            meta=state.build_meta(meta, step, world), extra=state.extra_state(extra),
                            optimizer=state.named_state(optimizer, "optimizer"),
                            scheduler=state.named_state(scheduler, "scheduler", prune=True),
                            scaler=state.named_state(scaler, "scaler"))
            self._scan()
            stepdir.clean_leftovers(self.directory, self._names, self._uncommitted, self.storage_options)
            plan = stepdir.prepare(self.directory, step, force, self.storage_options)
            return {"step": step, "plan": plan.to_json()}

        committed = False
        try:
            replies = _agree(f"{what} (collect)", collect)
            if len({r["step"] for r in replies}) != 1:
                raise DistributedError(f"{what}: ranks passed different steps {[r['step'] for r in replies]}",
                                       "call save() with the same step on every rank")
            plan = stepdir.WritePlan(**replies[0]["plan"])
            written = _agree(f"{what} (write)", lambda: self._write(plan, snapshot, rank))
            manifest: List[Manifest] = []

            def commit() -> None:
                if rank == 0:
                    manifest.append(self._manifest(step, snapshot, written, world))
                    stepdir.commit(plan, manifest[0], self.storage_options)
            _agree(f"{what} (commit)", commit)
            committed = True
        finally:
            if not committed and rank == 0 and plan is not None:
                stepdir.abort(plan, self.storage_options)
        if rank == 0:
            self._known[step] = CheckpointInfo(step, manifest[0].metrics)
            self._warned.discard(step)
            logger.info("committed checkpoint step %d at %s", step, plan.final)
            self._apply_retention(step)
        return plan.final

    def _write(self, plan: stepdir.WritePlan, snap: Mapping[str, Any], rank: int) -> Dict[str, Any]:
        root, prefix, opts = plan.root, plan.prefix, self.storage_options
        files: Dict[str, FileEntry] = {}
        components: Dict[str, str] = {}
        if rank == 0:
            name, files[name] = stepdir.write_model(root, *snap["model"], opts, prefix=prefix)
            components["model"] = name
            for comp in _COMPONENTS:
                if snap.get(comp) is not None:
                    name, files[name] = stepdir.write_component(root, comp, snap[comp], opts, prefix=prefix)
                    components[comp] = name
        rng_name, files[rng_name] = stepdir.write_component(root, f"rng-rank{rank:05d}", snap["rng"], opts,
                                                            prefix=prefix)
        if plan.mode == "local":
            storage.fsync_dir(storage.local_path(root))
        return {"files": {n: [e.size, e.sha256] for n, e in files.items()},
                "components": components, "rng": rng_name}

    @staticmethod
    def _manifest(step: int, snap: Mapping[str, Any], written: List[Dict[str, Any]], world: int) -> Manifest:
        files = {n: FileEntry(int(size), sha) for reply in written for n, (size, sha) in reply["files"].items()}
        components: Dict[str, Any] = dict(written[0]["components"])
        components["rng"] = {str(rank): reply["rng"] for rank, reply in enumerate(written)}
        return Manifest(step=step, files=files, components=components, metrics=snap["metrics"],
                        world_size=world, time=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _apply_retention(self, saved: int) -> None:
        """Delete what the policy drops (rank 0, after the commit; failures only logged)."""
        infos = list(self._known.values())
        protected = {saved}
        if self._restored_step is not None and self._restored_step == max(self._known):
            protected.add(self._restored_step)
        for step in steps_to_delete(infos, self.policy, protected):
            try:
                stepdir.delete_step(self.directory, step, self.storage_options)
            except Exception as exc:  # the new checkpoint is committed; deleting can wait
                logger.warning("retention could not delete step %d: %s", step, exc)
                continue
            self._known.pop(step, None)
            logger.info("retention deleted checkpoint step %d", step)

    # ------------------------------------------------------------------ restore

    def restore(self, step: Optional[int] = None, *, model: nn.Module, optimizer: Any = None,
                scheduler: Any = None, scaler: Any = None, extra: Optional[Mapping[str, Any]] = None,
                strict: bool = True, verify: bool = True,
                map_location: MapLocation = None) -> Optional[RestoredCheckpoint]:
        """Load a checkpoint into the given objects.

        Every file is checked against the manifest before anything is applied:
        sizes always, sha256 with ``verify``. Without a ``step``, the newest
        committed checkpoint that checks out is used; damaged newer ones are
        skipped with a warning. Under torch.distributed rank 0 picks the step
        and every rank loads it (and its own RNG state).

        Args:
            step: Step to restore; None for the latest good one.
            model: Model to load the weights into (wrapped or not).
            optimizer, scheduler, scaler: As passed to :meth:`save` (same names for dicts).
            extra: Objects with ``load_state_dict`` to restore by key.
            strict: Model keys and shapes must match exactly, and every object
                passed must have saved state.
            verify: Check sha256 of every file (sizes are always checked).
            map_location: Where to put loaded tensors (as for ``torch.load``).

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
            step = _check_step(step)
        rank = dist.get_rank()
        loaded: Dict[str, Any] = {}

        def choose() -> Optional[int]:
            if rank != 0:
                return None
            chosen, payload = self._choose(step, verify, map_location)
            loaded.update(payload or {})
            return chosen
        chosen = _agree(f"restoring from {self.directory} (choose)", choose)[0]
        if chosen is None:
            return None
        what = f"restoring step {chosen} from {self.directory}"
        if rank != 0:
            _agree(f"{what} (read)", lambda: loaded.update(self._read(chosen, rank, verify, map_location)))
        else:
            _agree(f"{what} (read)", lambda: None)
        values: Dict[str, Any] = {}
        _agree(f"{what} (apply)", lambda: values.update(self._apply(loaded, model, optimizer, scheduler, scaler,
                                                                     extra, strict)))
        self._restored_step = chosen
        manifest: Manifest = loaded["manifest"]
        return RestoredCheckpoint(step=chosen, extra=values, meta=state.plain(loaded.get("meta") or {}),
                                  metrics=dict(manifest.metrics), path=self._step_uri(chosen))

    def _choose(self, step: Optional[int], verify: bool, map_location: MapLocation):
        """Rank 0: the step to restore and its loaded files (falling back past damaged ones)."""
        if step is not None:
            return step, self._read(step, 0, verify, map_location, check_all=True)
        candidates = sorted(self._scan(), reverse=True)
        failures = []
        for candidate in candidates:
            try:
                return candidate, self._read(candidate, 0, verify, map_location, check_all=True)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                logger.warning("checkpoint step %d is damaged, trying an older one: %s", candidate, exc)
                failures.append(f"step {candidate}: {exc}")
        if failures:
            raise CorruptCheckpointError(f"every checkpoint in {self.directory} is damaged:\n" + "\n".join(failures))
        return None, None

    def _read(self, step: int, rank: int, verify: bool, map_location: MapLocation,
              check_all: bool = False) -> Dict[str, Any]:
        """Read (and check) everything this rank needs from ``step``; nothing is applied yet."""
        uri, opts = self._step_uri(step), self.storage_options
        try:
            manifest = stepdir.read_manifest(uri, opts)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(f"step {step} has no committed checkpoint in {self.directory}",
                                          f"committed steps: {self.all_steps() or 'none'}") from None
        if manifest.step != step:
            raise CorruptCheckpointError(f"{uri}: the manifest records step {manifest.step}")
        check_sizes(manifest, storage.list_files(uri, opts), uri)
        out: Dict[str, Any] = {"manifest": manifest}
        out["model"] = stepdir.read_model(uri, manifest, verify, map_location, opts)
        for comp in _COMPONENTS:
            name = manifest.file_for(comp)
            out[comp] = None if name is None else stepdir.read_component(uri, manifest, name, verify,
                                                                          map_location, opts)
        rng_name = manifest.rng_file(rank)
        out["rng"] = None if rng_name is None else stepdir.read_component(uri, manifest, rng_name, verify, None, opts)
        if check_all and verify:  # the other ranks' RNG files: rank 0 vouches for the whole step
            for other in range(manifest.world_size):
                name = manifest.rng_file(other)
                if other != rank and name is not None:
                    verify_file(storage.join(uri, name), name, manifest.files[name], uri, opts)
        return out

    @staticmethod
    def _apply(loaded: Mapping[str, Any], model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
               extra: Optional[Mapping[str, Any]], strict: bool) -> Dict[str, Any]:
        weights, module_meta = loaded["model"]
        state.apply_model(model, weights, module_meta, strict)
        state.apply_named(optimizer, loaded["optimizer"], "optimizer", strict)
        state.apply_named(scheduler, loaded["scheduler"], "scheduler", strict)
        state.apply_named(scaler, loaded["scaler"], "scaler", strict)
        values = state.apply_extra(extra, loaded["extra"])
        if loaded["rng"] is not None:
            state.apply_rng(loaded["rng"])
        else:
            logger.warning("step %d has no RNG state for rank %d (saved with %d ranks); RNG not restored",
                           loaded["manifest"].step, dist.get_rank(), loaded["manifest"].world_size)
        return values

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this CheckpointManager is closed", "create a new one")

    def wait(self) -> None:
        """Block until pending saves are committed (saves are synchronous for now: returns at once)."""

    def close(self) -> None:
        """Wait for pending work; the manager cannot save or restore afterwards."""
        self.wait()
        self._closed = True

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


def load_manager_checkpoint(uri: str, map_location: MapLocation = None,
                            storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load the model weights of a manager checkpoint (what ``load_checkpoint`` calls for directories).

    Args:
        uri: A step directory (``.../step_00000100``) or a manager directory
            (its newest good checkpoint).
        map_location: As for ``torch.load``.
        storage_options: fsspec options for URLs.

    Returns:
        ``{'state_dict', 'meta', 'step', 'metrics'}``, after checking the
        weights and meta files against the manifest (sizes and sha256).

    Raises:
        CheckpointNotFoundError: no committed checkpoint there.
        CorruptCheckpointError: the step (or, for a manager directory, every step) is damaged.
    """
    uri = str(uri)
    trimmed = uri.rstrip("/") or uri
    step = parse_step_name(trimmed.rsplit("/", 1)[-1])
    if step is not None:
        return _load_weights(trimmed, step, map_location, storage_options)
    steps = CheckpointManager(trimmed, max_to_keep=None, storage_options=storage_options).all_steps()
    if not steps:
        raise CheckpointNotFoundError(f"{uri} is a directory with no committed checkpoint",
                                      "pass a checkpoint file, a step_XXXXXXXX directory, or a manager directory")
    failures = []
    for candidate in reversed(steps):
        try:
            return _load_weights(storage.join(trimmed, step_name(candidate)), candidate, map_location,
                                 storage_options)
        except CorruptCheckpointError as exc:
            logger.warning("checkpoint step %d is damaged, trying an older one: %s", candidate, exc)
            failures.append(str(exc))
    raise CorruptCheckpointError(f"every checkpoint in {uri} is damaged:\n" + "\n".join(failures))


def _load_weights(step_uri: str, step: int, map_location: MapLocation,
                  storage_options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    try:
        manifest = stepdir.read_manifest(step_uri, storage_options)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"{step_uri} has no manifest: that save never committed",
                                      "load another step; `ckptmgr ls DIR` lists committed ones") from None
    if manifest.step != step:
        raise CorruptCheckpointError(f"{step_uri}: the manifest records step {manifest.step}")
    weights, module_meta = stepdir.read_model(step_uri, manifest, True, map_location, storage_options)
    name = manifest.file_for("meta")
    meta = stepdir.read_component(step_uri, manifest, name, True, None, storage_options) if name else {}
    if module_meta:
        weights._metadata = module_meta  # type: ignore[attr-defined]
    return {"state_dict": weights, "meta": state.plain(meta), "step": step, "metrics": dict(manifest.metrics)}
