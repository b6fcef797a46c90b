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

import logging
from typing import Any, Dict, Optional

import torch

from ..errors import CheckpointFormatError
from ..format.checksum import DEFAULT_CHECKSUM
from ..format.manifest import Manifest
from ..format.maplocation import MapLocation
from ..io.store import Store
from ..sharded import detect
from ..sharded.layout import FORMAT as SHARDED_FORMAT
from ..state import engines, objects
from ..state.models import modules_of
from ..state.staging import StagingBuffers
from . import models
from .format_base import Into, StepFormat
from .records import Applied, LoadedStep, RankFiles, Snapshot, TrainingObjects

logger = logging.getLogger(__name__)

__all__ = ["StepFormat", "PlainFormat", "ShardedFormat", "Formats", "format_of"]


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
