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

from ..distributed import agree
from ..errors import CheckpointFormatError, CorruptCheckpointError
from ..format.manifest import Manifest, verify_file
from ..format.maplocation import MapLocation
from ..format.skeleton import to_skeleton
from ..io.store import Store
from ..sharded import detect
from ..sharded.layout import FORMAT as SHARDED_FORMAT
from ..state import engines, objects
from ..state.models import modules_of
from ..state.partial import FROZEN
from ..state.staging import StagingBuffers
from . import models, rankstate
from .files import read_component, read_model, run_concurrently, write_component
from .records import COMPONENTS, Applied, LoadedStep, ModelStates, RankFiles, Snapshot, TrainingObjects

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

    def collect(self, step: int, objs: TrainingObjects, metrics: Any, meta: Any, rank: int, world: int,
                replicated: Optional[bool] = None) -> Snapshot:
        """This rank's share of the step (live tensors).

        Three parts: what is local to this rank (RNG and ``rank_state``); the
        engines' collective steps, which every rank runs (ZeRO consolidation,
        DCP over FSDP); the replicated state, on rank 0. When there is a
        collective step, the ranks first agree that every one collected its
        local part, so a rank that failed never leaves the others waiting
        inside an engine's collective. ``replicated`` overrides who collects the
        replicated state (a tiered save has the first rank of every node write
        it to that node's disk).
        """
        def local() -> Snapshot:
            self.check(objs)
            return Snapshot(step=step, rng=objects.rng_state(distributed=world > 1),
                            rank_state=rankstate.collect(objs.rank_state))
        if world > 1 and self.collective(objs):
            got = []
            agree(f"collecting step {step}", lambda: got.append(local()))
            snapshot = got[0]
        else:
            snapshot = local()
        self.collect_engines(snapshot, objs)
        if (rank == 0) if replicated is None else replicated:
            snapshot.metrics = objects.clean_metrics(metrics)
            snapshot.components = {
                "optimizer": None if self.owns_optimizer else objects.named_state(objs.optimizer, "optimizer"),
                "scheduler": objects.named_state(objs.scheduler, "scheduler", prune=True),
                "scaler": objects.named_state(objs.scaler, "scaler"),
                "extra": objects.extra_state(objs.extra),
                "meta": objects.build_meta(meta, step, world)}
        return snapshot

    def check(self, objs: TrainingObjects) -> None:
        """Refuse objects this format cannot save (before any collective)."""

    def collective(self, objs: TrainingObjects) -> bool:
        """Whether collecting needs every rank (a ZeRO optimizer must be consolidated)."""
        named = objects.as_named(objs.optimizer, "optimizer")
        return named is not None and bool(engines.zero_optimizers(named[1]))

    def collect_engines(self, snapshot: Snapshot, objs: TrainingObjects) -> None:
        """Every rank: the engines' collective steps (ZeRO optimizers consolidated on rank 0)."""
        named = objects.as_named(objs.optimizer, "optimizer")
        if named is not None:
            engines.consolidate(named[1])

    owns_optimizer = False  # True when the engine writes optimizer state itself

    def stage(self, snapshot: Snapshot, buffers: StagingBuffers) -> Snapshot:
        """A copy of ``snapshot`` in reusable CPU buffers, so training may change the originals now."""
        models = snapshot.model
        staged = buffers.stage_tree({"rng": snapshot.rng, "components": snapshot.components,
                                     "rank_state": snapshot.rank_state,
                                     "models": None if models is None else models.states})
        return Snapshot(step=snapshot.step, rng=staged["rng"], components=staged["components"],
                        model=None if models is None else ModelStates(models.single, staged["models"]),
                        metrics=dict(snapshot.metrics), sharded=snapshot.sharded, rank_state=staged["rank_state"],
                        frozen=snapshot.frozen)

    def write(self, store: Store, prefix: str, snapshot: Snapshot, rank: int, group: Any = None) -> RankFiles:
        """Write this rank's files into ``store`` (names start with ``prefix``); report them for the manifest.

        The replicated files are written by whichever rank collected them (see :meth:`collect`).
        """
        jobs: Dict[str, Callable[[], Any]] = {}
        if snapshot.model is not None:
            jobs.update(models.write_jobs(store, prefix, snapshot.model))
        for comp in COMPONENTS:
            if snapshot.components.get(comp) is not None:
                jobs[comp] = functools.partial(write_component, store, comp, snapshot.components[comp], prefix=prefix)
        jobs["rng"] = functools.partial(write_component, store, f"rng-rank{rank:05d}", snapshot.rng, prefix=prefix)
        if snapshot.rank_state is not None:
            jobs["rank_state"] = functools.partial(write_component, store, rankstate.base_name(rank),
                                                   snapshot.rank_state, prefix=prefix)
        done = run_concurrently(jobs, "ckptmgr-write")
        files = dict(done.values())
        rng_name = done.pop("rng")[0]
        rank_state = done.pop("rank_state", (None, None))[0]
        written = {job[len(models.JOB_PREFIX):]: done.pop(job)[0] for job in list(done)
                   if job.startswith(models.JOB_PREFIX)}
        components: Dict[str, Any] = {comp: name for comp, (name, _) in done.items()}
        if snapshot.model is not None:
            components.update(models.manifest_entries(snapshot.model, written))
        store.sync_dir()
        if snapshot.frozen and snapshot.model is not None:  # the manifest records what was left out
            components[FROZEN] = models.frozen_component(snapshot.model, snapshot.frozen)
        return RankFiles(files, components, rng_name, rank_state)

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
            jobs.update(models.read_jobs(store, manifest, verify, map_location, into))
            if not jobs:
                raise CorruptCheckpointError(f"{store.root}: the manifest names no model weights file")
        for comp in COMPONENTS:
            name = manifest.file_for(comp)
            if name is not None:
                jobs[comp] = functools.partial(read_component, store, manifest, name, verify, map_location,
                                               into.get(comp))
        done = run_concurrently(jobs, "ckptmgr-read")  # the files are independent: read and hash them at once
        model = models.gather(manifest, done) if self.reads_model else None
        loaded = LoadedStep(manifest, store.root, model=model, components=done)
        name = manifest.rng_file(rank)
        loaded.rng = None if name is None else read_component(store, manifest, name, verify)
        if check_all and verify:
            for other in range(manifest.world_size):
                name = manifest.rng_file(other)
                if other != rank and name is not None:
                    verify_file(store, name, manifest.files[name])
        return loaded

    reads_model = True

    def inplace_targets(self, objs: TrainingObjects) -> Dict[str, Dict[str, torch.Tensor]]:
        """Existing CPU tensors a restore may read straight into, keyed as the step's files name them.

        The model's parameters and buffers (by their bare keys) and the
        optimizer's state tensors (by their path in the saved structure) are
        returned as detached aliases; a restore fills them in place, so loading
        needs no second copy of the state in memory. Tensors on other devices are left out.
        """
        skip = objs.exclude  # excluded tensors are never read into
        targets = models.inplace_targets(objs.model, skip)
        named = None if skip.drops("optimizer") else objects.as_named(objs.optimizer, "optimizer")
        if named is not None and not engines.zero_optimizers(named[1]):  # ZeRO's state_dict() is a collective
            optim = objects.named_state(objs.optimizer, "optimizer")
            targets["optimizer"] = {k: v.detach() for k, v in to_skeleton(optim, path="optimizer")[1].items()
                                    if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
        return targets

    def apply(self, loaded: LoadedStep, store: Store, objs: TrainingObjects, strict: bool,
              group: Any = None, rng: bool = True) -> Applied:
        """Put what :meth:`read` returned into the live objects, RNG last (``rng``); returns the restored values.

        Raises:
            KeyMismatchError: ``strict`` and the model does not match.
            CheckpointFormatError: an object passed has no saved state (``strict``) or other names.
        """
        skip, what = objs.exclude, f"step {loaded.manifest.step}"
        skip.log_components(what)
        if loaded.model is not None and not skip.drops("model"):
            models.apply(objs.model, loaded.model, strict, loaded.manifest.components, skip, what)
        if not self.owns_optimizer and not skip.drops("optimizer"):
            objects.apply_named(objs.optimizer, loaded.get("optimizer"), "optimizer", strict,
                                load=engines.load_optimizer)
        for comp in ("scheduler", "scaler"):
            if not skip.drops(comp):
                objects.apply_named(getattr(objs, comp), loaded.get(comp), comp, strict)
        values = Applied(extra={} if skip.drops("extra") else objects.apply_extra(objs.extra, loaded.get("extra")),
                         rank_state={} if skip.drops("rank_state") else rankstate.apply(
                             objs.rank_state, loaded.rank_state, loaded.rank_state_skipped, loaded.manifest, strict))
        if not rng:
            return values
        if loaded.rng is not None:
            if not skip.drops("rng"):
                objects.apply_rng(loaded.rng)
        elif not skip.drops("rng"):
            logger.warning("step %d has no RNG state for this rank (saved with %d ranks); RNG not restored",
                           loaded.manifest.step, loaded.manifest.world_size)
        return values

    def load_weights(self, store: Store, manifest: Manifest, map_location: MapLocation,
                     model_name: Optional[str] = None) -> Any:
        """The state dict of the step's model, or of ``model_name`` (module versions in ``_metadata``), verified.

        Raises:
            CheckpointFormatError: ``model_name`` was not saved, or it is None and several models were.
        """
        saved = models.saved_models(manifest)
        if saved is None:
            raise CorruptCheckpointError(f"{store.root}: the manifest names no model weights file")
        name = saved[1][models.choose(saved[1], model_name, store.root)]
        weights, module_meta = read_model(store, manifest, True, map_location, name=name)
        if module_meta:
            weights._metadata = module_meta  # type: ignore[attr-defined]
        return weights


class PlainFormat(StepFormat):
    """Replicated model and optimizer, written once by rank 0."""

    name = "plain"

    def __init__(self, save_frozen: bool = True) -> None:
        self.save_frozen = save_frozen

    def collect(self, step: int, objs: TrainingObjects, metrics: Any, meta: Any, rank: int, world: int,
                replicated: Optional[bool] = None) -> Snapshot:
        snapshot = super().collect(step, objs, metrics, meta, rank, world, replicated)
        if (rank == 0) if replicated is None else replicated:
            snapshot.model, snapshot.frozen = models.collect(objs.model, self.save_frozen)
        return snapshot


class ShardedFormat(StepFormat):
    """Model and optimizer through DCP on every rank (FSDP2, tensor parallel); resharded on load."""

    name = "sharded"
    owns_optimizer = True
    reads_model = False

    def __init__(self) -> None:
        from ..sharded.engine import Stager
        self._stager = Stager()

    def check(self, objs: TrainingObjects) -> None:
        named = objects.as_named(objs.optimizer, "optimizer")
        zero = [] if named is None else engines.zero_optimizers(named[1])
        if zero:  # DCP would run a zero-lr step on it to "initialise" its state, then fail
            raise CheckpointFormatError(f"optimizer {zero} is a ZeroRedundancyOptimizer, which a sharded (DCP) "
                                        "save cannot hold", "save the model sharded=False (DDP with ZeRO needs no "
                                        "sharded save), or shard the optimizer with FSDP instead of ZeRO")

    def collective(self, objs: TrainingObjects) -> bool:
        return True  # DCP's state dicts of FSDP1 modules all-gather

    def collect_engines(self, snapshot: Snapshot, objs: TrainingObjects) -> None:
        from ..sharded.engine import collect
        snapshot.sharded = collect(objs.model, objs.optimizer)

    def stage(self, snapshot: Snapshot, buffers: StagingBuffers) -> Snapshot:
        staged = super().stage(snapshot, buffers)
        assert_sharded(snapshot)
        staged.sharded = self._stager.stage(snapshot.sharded)  # type: ignore[arg-type]
        return staged

    def write(self, store: Store, prefix: str, snapshot: Snapshot, rank: int, group: Any = None) -> RankFiles:
        from ..sharded.engine import save_shards
        from ..sharded.layout import METADATA_NAME
        assert_sharded(snapshot)
        write_store = store.sub(prefix) if prefix else store
        shards = save_shards(write_store, snapshot.sharded, rank, group)  # type: ignore[arg-type]
        report = super().write(store, prefix, snapshot, rank, group)
        report.files.update({prefix + name: entry for name, entry in shards.items()})
        if rank == 0:
            from ..distributed import get_world_size
            report.components["sharded"] = {
                "format": SHARDED_FORMAT, "metadata": prefix + METADATA_NAME, "world_size": get_world_size(),
                "optimizer": snapshot.sharded.optimizer,  # type: ignore[union-attr]
                "torch_version": torch.__version__}
            if snapshot.sharded.models is not None:  # type: ignore[union-attr]
                report.components["sharded"]["models"] = snapshot.sharded.models  # type: ignore[union-attr]
        return report

    def read(self, store: Store, manifest: Manifest, rank: int, verify: bool, map_location: MapLocation,
             into: Into, check_all: bool) -> LoadedStep:
        from ..sharded.engine import check_files
        check_files(store, manifest, check_all and verify)  # DCP files every rank loads later: check them now
        return super().read(store, manifest, rank, verify, map_location, into, check_all)

    def inplace_targets(self, objs: TrainingObjects) -> Dict[str, Dict[str, torch.Tensor]]:
        return {}  # DCP loads into the live (sharded) tensors itself

    def apply(self, loaded: LoadedStep, store: Store, objs: TrainingObjects, strict: bool,
              group: Any = None, rng: bool = True) -> Applied:
        from ..sharded.engine import load_into
        if objs.exclude.patterns or objs.exclude.drops("model"):
            raise CheckpointFormatError(f"{store.root} is a sharded step: exclude takes only component names "
                                        "other than 'model' there", "restore it whole, or exclude components")
        optimizer = None if objs.exclude.drops("optimizer") else objs.optimizer
        load_into(store, loaded.manifest, objs.model, optimizer, strict, group)  # every rank: a collective
        return super().apply(loaded, store, objs, strict, group, rng)

    def load_weights(self, store: Store, manifest: Manifest, map_location: MapLocation,
                     model_name: Optional[str] = None) -> Any:
        from ..sharded.consolidate import consolidate
        from ..state.keys import select_prefix
        names = manifest.components["sharded"].get("models")
        weights = consolidate(store)
        if not names:
            models.choose({"model": None}, model_name, store.root)
            return weights
        return select_prefix(weights, models.choose(dict.fromkeys(names), model_name, store.root))

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
        save_frozen: ``CheckpointManager(save_frozen=...)``: False leaves frozen parameters out of plain saves.
    """

    def __init__(self, setting: Any, save_frozen: bool = True) -> None:
        self.setting = detect.check_setting(setting)
        self.save_frozen = bool(save_frozen)
        self._plain = PlainFormat(self.save_frozen)
        self._sharded: Optional[ShardedFormat] = None

    def _sharded_format(self) -> "ShardedFormat":
        if self._sharded is None:
            self._sharded = ShardedFormat()
        return self._sharded

    def for_save(self, model: Any) -> StepFormat:
        """Sharded when the setting is True, or ``'auto'`` and a model holds DTensors or FSDP; plain otherwise.

        Raises:
            CheckpointFormatError: ``sharded=False`` but a model is wrapped by FSDP, or the save
                would be sharded and ``save_frozen`` is False.
        """
        if not detect.use_sharded(self.setting, modules_of(model)):
            return self._plain
        if not self.save_frozen:
            raise CheckpointFormatError("save_frozen=False is for plain saves; this model is saved sharded",
                                        "pass save_frozen=True, or sharded=False for a model that fits on one rank")
        return self._sharded_format()

    def for_manifest(self, manifest: Manifest) -> StepFormat:
        """The format a committed step was written in."""
        return self._sharded_format() if _is_sharded(manifest) else self._plain

    def release(self) -> None:
        """Drop staging copies."""
        if self._sharded is not None:
            self._sharded.release()
