"""What a step holds and how each rank writes, reads and applies it: one strategy per engine.

A save chooses its format once (:meth:`Formats.for_save`), a restore reads it
from the manifest (:meth:`Formats.for_manifest`, :func:`format_of`); nothing
outside this module asks whether a step is sharded.

* :class:`PlainFormat`: rank 0 writes the model (``model.safetensors``) and
  every replicated component; every rank writes its own RNG file.
* :class:`ShardedFormat`: model and optimizer state go through DCP on every
  rank (``__<rank>_0.distcp`` plus ``dcp.metadata``); the other components are
  written as in the plain format.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Optional

import torch

from ..format.checksum import DEFAULT_CHECKSUM
from ..format.manifest import Manifest, verify_file
from ..format.maplocation import MapLocation
from ..format.skeleton import to_skeleton
from ..io.store import Store
from ..sharded import detect
from ..sharded.layout import FORMAT as SHARDED_FORMAT
from ..state import objects
from ..state.modules import get_state_dict
from ..state.staging import StagingBuffers
from .files import read_component, read_model, run_concurrently, write_component, write_model
from .records import COMPONENTS, LoadedStep, RankFiles, Snapshot, TrainingObjects

logger = logging.getLogger(__name__)

__all__ = ["StepFormat", "PlainFormat", "ShardedFormat", "Formats", "format_of"]

Into = Optional[Dict[str, Dict[str, torch.Tensor]]]


class StepFormat:
    """How one kind of step is collected, written, read and applied.

    A save calls :meth:`collect` (every rank), :meth:`stage` for an async save,
    then :meth:`write` on every rank into the step's write directory; the step
    layer builds the manifest from every rank's :class:`RankFiles`. A restore
    calls :meth:`read` (which checks every file it needs against the manifest)
    and, once every rank read its part, :meth:`apply`.
    """

    name: str = ""

    # ------------------------------------------------------------------ save

    def collect(self, step: int, objs: TrainingObjects, metrics: Any, meta: Any, rank: int, world: int) -> Snapshot:
        """This rank's share of the step (live tensors): RNG everywhere, the replicated state on rank 0."""
        snapshot = Snapshot(step=step, rng=objects.rng_state(distributed=world > 1))
        if rank == 0:
            snapshot.metrics = objects.clean_metrics(metrics)
            snapshot.components = {
                "optimizer": None if self.owns_optimizer else objects.named_state(objs.optimizer, "optimizer"),
                "scheduler": objects.named_state(objs.scheduler, "scheduler", prune=True),
                "scaler": objects.named_state(objs.scaler, "scaler"),
                "extra": objects.extra_state(objs.extra),
                "meta": objects.build_meta(meta, step, world)}
        return snapshot

    owns_optimizer = False  # True when the engine writes optimizer state itself

    def stage(self, snapshot: Snapshot, buffers: StagingBuffers) -> Snapshot:
        """A copy of ``snapshot`` in reusable CPU buffers, so training may change the originals now."""
        staged = buffers.stage_tree({"rng": snapshot.rng, "model": snapshot.model, "components": snapshot.components})
        return Snapshot(snapshot.step, staged["rng"], staged["model"], staged["components"], dict(snapshot.metrics),
                        snapshot.sharded)

    def write(self, store: Store, prefix: str, snapshot: Snapshot, rank: int, group: Any = None,
              checksum: str = DEFAULT_CHECKSUM) -> RankFiles:
        """Write this rank's files into ``store`` (names start with ``prefix``), hashed (``checksum``); report them."""
        jobs: Dict[str, Callable[[], Any]] = {}
        if rank == 0:
            if snapshot.model is not None:
                jobs["model"] = functools.partial(write_model, store, *snapshot.model, prefix=prefix, checksum=checksum)
            for comp in COMPONENTS:
                if snapshot.components.get(comp) is not None:
                    jobs[comp] = functools.partial(write_component, store, comp, snapshot.components[comp],
                                                   prefix=prefix, checksum=checksum)
        jobs["rng"] = functools.partial(write_component, store, f"rng-rank{rank:05d}", snapshot.rng, prefix=prefix,
                                        checksum=checksum)
        done = run_concurrently(jobs, "ckptmgr-write", cpu_bound=store.is_local)
        rng_name, rng_entry = done.pop("rng")
        files = dict(done.values())
        files[rng_name] = rng_entry
        store.sync_dir()
        return RankFiles(files, {comp: name for comp, (name, _) in done.items()}, rng_name)

    # ------------------------------------------------------------------ restore

    def read(self, store: Store, manifest: Manifest, rank: int, verify: bool, map_location: MapLocation,
             into: Into, check_all: bool) -> LoadedStep:
        """Read (and check) what ``rank`` needs from the step directory ``store``; nothing is applied.

        With ``check_all`` the files only other ranks read are verified too, so
        one reader can vouch for the whole step. ``into`` maps ``'model'`` and
        component names to live tensors to read into in place.
        """
        into = into or {}
        jobs: Dict[str, Callable[[], Any]] = {}
        if self.reads_model:
            jobs["model"] = functools.partial(read_model, store, manifest, verify, map_location, into.get("model"))
        for comp in COMPONENTS:
            name = manifest.file_for(comp)
            if name is not None:
                jobs[comp] = functools.partial(read_component, store, manifest, name, verify, map_location,
                                               into.get(comp))
        done = run_concurrently(jobs, "ckptmgr-read")  # the files are independent: read and hash them at once
        loaded = LoadedStep(manifest, store.root, model=done.pop("model", None), components=done)
        name = manifest.rng_file(rank)
        loaded.rng = None if name is None else read_component(store, manifest, name, verify)
        if check_all and verify:
            for other in range(manifest.world_size):
                name = manifest.rng_file(other)
                if other != rank and name is not None:
                    verify_file(store, name, manifest.files[name], manifest.checksum)
        return loaded

    reads_model = True

    def inplace_targets(self, objs: TrainingObjects) -> Dict[str, Dict[str, torch.Tensor]]:
        """Existing CPU tensors a restore may read straight into, keyed as the step's files name them.

        The model's parameters and buffers (by their bare keys) and the
        optimizer's state tensors (by their path in the saved structure) are
        returned as detached aliases; a restore fills them in place, so loading
        needs no second copy of the state in memory. Tensors on other devices are left out.
        """
        def on_cpu(tensors: Any) -> Dict[str, torch.Tensor]:
            return {k: v.detach() for k, v in tensors.items()
                    if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
        targets = {"model": on_cpu(get_state_dict(objs.model))}
        optim = objects.named_state(objs.optimizer, "optimizer")
        if optim is not None:
            targets["optimizer"] = on_cpu(to_skeleton(optim, path="optimizer")[1])
        return targets

    def apply(self, loaded: LoadedStep, store: Store, objs: TrainingObjects, strict: bool,
              group: Any = None) -> Dict[str, Any]:
        """Put what :meth:`read` returned into the live objects, RNG last; returns the restored extra values.

        Raises:
            KeyMismatchError: ``strict`` and the model does not match.
            CheckpointFormatError: an object passed has no saved state (``strict``) or other names.
        """
        if loaded.model is not None:
            objects.apply_model(objs.model, loaded.model[0], loaded.model[1], strict)
        if not self.owns_optimizer:
            objects.apply_named(objs.optimizer, loaded.get("optimizer"), "optimizer", strict)
        objects.apply_named(objs.scheduler, loaded.get("scheduler"), "scheduler", strict)
        objects.apply_named(objs.scaler, loaded.get("scaler"), "scaler", strict)
        values = objects.apply_extra(objs.extra, loaded.get("extra"))
        if loaded.rng is not None:
            objects.apply_rng(loaded.rng)
        else:
            logger.warning("step %d has no RNG state for this rank (saved with %d ranks); RNG not restored",
                           loaded.manifest.step, loaded.manifest.world_size)
        return values

    def load_weights(self, store: Store, manifest: Manifest, map_location: MapLocation) -> Any:
        """The model state dict of the step (module versions in ``_metadata``), verified."""
        weights, module_meta = read_model(store, manifest, True, map_location)
        if module_meta:
            weights._metadata = module_meta  # type: ignore[attr-defined]
        return weights


class PlainFormat(StepFormat):
    """Replicated model and optimizer, written once by rank 0."""

    name = "plain"

    def collect(self, step: int, objs: TrainingObjects, metrics: Any, meta: Any, rank: int, world: int) -> Snapshot:
        snapshot = super().collect(step, objs, metrics, meta, rank, world)
        if rank == 0:
            snapshot.model = objects.model_state(objs.model)
        return snapshot


class ShardedFormat(StepFormat):
    """Model and optimizer through DCP on every rank (FSDP2, tensor parallel); resharded on load."""

    name = "sharded"
    owns_optimizer = True
    reads_model = False

    def __init__(self) -> None:
        from ..sharded.engine import Stager
        self._stager = Stager()

    def collect(self, step: int, objs: TrainingObjects, metrics: Any, meta: Any, rank: int, world: int) -> Snapshot:
        from ..sharded.engine import collect
        snapshot = super().collect(step, objs, metrics, meta, rank, world)
        snapshot.sharded = collect(objs.model, objs.optimizer)
        return snapshot

    def stage(self, snapshot: Snapshot, buffers: StagingBuffers) -> Snapshot:
        staged = super().stage(snapshot, buffers)
        assert_sharded(snapshot)
        staged.sharded = self._stager.stage(snapshot.sharded)  # type: ignore[arg-type]
        return staged

    def write(self, store: Store, prefix: str, snapshot: Snapshot, rank: int, group: Any = None,
              checksum: str = DEFAULT_CHECKSUM) -> RankFiles:
        from ..sharded.engine import save_shards
        from ..sharded.layout import METADATA_NAME
        assert_sharded(snapshot)
        write_store = store.sub(prefix) if prefix else store
        shards = save_shards(write_store, snapshot.sharded, rank, group, checksum)  # type: ignore[arg-type]
        report = super().write(store, prefix, snapshot, rank, group, checksum)
        report.files.update({prefix + name: entry for name, entry in shards.items()})
        if rank == 0:
            from ..distributed import get_world_size
            report.components["sharded"] = {
                "format": SHARDED_FORMAT, "metadata": prefix + METADATA_NAME, "world_size": get_world_size(),
                "optimizer": snapshot.sharded.optimizer,  # type: ignore[union-attr]
                "torch_version": torch.__version__}
        return report

    def read(self, store: Store, manifest: Manifest, rank: int, verify: bool, map_location: MapLocation,
             into: Into, check_all: bool) -> LoadedStep:
        from ..sharded.engine import check_files
        check_files(store, manifest, check_all and verify)  # DCP files every rank loads later: check them now
        return super().read(store, manifest, rank, verify, map_location, into, check_all)

    def inplace_targets(self, objs: TrainingObjects) -> Dict[str, Dict[str, torch.Tensor]]:
        return {}  # DCP loads into the live (sharded) tensors itself

    def apply(self, loaded: LoadedStep, store: Store, objs: TrainingObjects, strict: bool,
              group: Any = None) -> Dict[str, Any]:
        from ..sharded.engine import load_into
        load_into(store, loaded.manifest, objs.model, objs.optimizer, strict, group)  # every rank: a collective
        return super().apply(loaded, store, objs, strict, group)

    def load_weights(self, store: Store, manifest: Manifest, map_location: MapLocation) -> Any:
        from ..sharded.consolidate import consolidate
        return consolidate(store)

    def release(self) -> None:
        """Drop the async staging copy."""
        self._stager.release()


def assert_sharded(snapshot: Snapshot) -> None:
    """A sharded format's snapshot carries DCP state (an internal invariant, not user input)."""
    if snapshot.sharded is None:
        raise RuntimeError("internal error: a sharded save collected no DCP state")


def _is_sharded(manifest: Manifest) -> bool:
    return isinstance(manifest.components.get("sharded"), dict)


def format_of(manifest: Manifest) -> StepFormat:
    """The format a committed step was written in (from its manifest)."""
    return ShardedFormat() if _is_sharded(manifest) else PlainFormat()


class Formats:
    """The formats one manager uses, each created once (a sharded format keeps its async staging copy).

    Args:
        setting: ``CheckpointManager(sharded=...)``: ``'auto'``, True or False.
    """

    def __init__(self, setting: Any) -> None:
        self.setting = detect.check_setting(setting)
        self._plain = PlainFormat()
        self._sharded: Optional[ShardedFormat] = None

    def _sharded_format(self) -> "ShardedFormat":
        if self._sharded is None:
            self._sharded = ShardedFormat()
        return self._sharded

    def for_save(self, model: Any) -> StepFormat:
        """Sharded when the setting is True, or ``'auto'`` and the model holds DTensors; plain otherwise."""
        return self._sharded_format() if detect.use_sharded(self.setting, model) else self._plain

    def for_manifest(self, manifest: Manifest) -> StepFormat:
        """The format a committed step was written in."""
        return self._sharded_format() if _is_sharded(manifest) else self._plain

    def release(self) -> None:
        """Drop staging copies."""
        if self._sharded is not None:
            self._sharded.release()
