"""The base of every step format: what one rank collects, writes, reads and applies, component by component.

:class:`StepFormat` holds what every format shares: the replicated
components (optimizer, scheduler, scaler, extra, meta) written by the rank(s)
that collect them, each rank's RNG and rank-state files, the models' files,
reading them back verified and applying them to live objects.
:mod:`ckptmgr.step.formats` has the formats themselves (plain, sharded) and
chooses between them.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Optional

import torch

from ..distributed import agree
from ..errors import CorruptCheckpointError
from ..format.checksum import DEFAULT_CHECKSUM
from ..format.manifest import Manifest, verify_file
from ..format.maplocation import MapLocation
from ..format.skeleton import to_skeleton
from ..io.store import Store
from ..state import engines, objects
from ..state.partial import FROZEN
from ..state.staging import StagingBuffers
from . import models, rankstate
from .files import read_component, read_files, read_model, run_concurrently, write_component
from .records import COMPONENTS, Applied, LoadedStep, ModelStates, RankFiles, Snapshot, TrainingObjects

logger = logging.getLogger(__name__)

__all__ = ["StepFormat", "Into"]

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

    def write(self, store: Store, prefix: str, snapshot: Snapshot, rank: int, group: Any = None,
              checksum: str = DEFAULT_CHECKSUM) -> RankFiles:
        """Write this rank's files into ``store`` (names start with ``prefix``); report them for the manifest.

        The replicated files are written by whichever rank collected them (see :meth:`collect`).
        """
        jobs: Dict[str, Callable[[], Any]] = {}
        if snapshot.model is not None:
            jobs.update(models.write_jobs(store, prefix, snapshot.model, checksum))
        for comp in COMPONENTS:
            if snapshot.components.get(comp) is not None:
                jobs[comp] = functools.partial(write_component, store, comp, snapshot.components[comp], prefix=prefix,
                                               checksum=checksum)
        jobs["rng"] = functools.partial(write_component, store, f"rng-rank{rank:05d}", snapshot.rng, prefix=prefix,
                                        checksum=checksum)
        if snapshot.rank_state is not None:
            jobs["rank_state"] = functools.partial(write_component, store, rankstate.base_name(rank),
                                                   snapshot.rank_state, prefix=prefix, checksum=checksum)
        done = run_concurrently(jobs, "ckptmgr-write", cpu_bound=store.is_local)
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
        done = read_files(store, jobs)
        model = models.gather(manifest, done) if self.reads_model else None
        loaded = LoadedStep(manifest, store.root, model=model, components=done)
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
