"""What the phases of a save and a restore hand each other: typed records instead of dicts.

A save runs collect -> write (every rank) -> commit (rank 0); a restore runs
choose and read -> apply. The records below are the only things that cross
those boundaries; :class:`RankFiles` and :class:`WritePlan` also cross ranks,
as JSON through the save's agreement.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from torch import nn

from ..format.checksum import FileEntry
from ..format.manifest import Manifest
from ..sharded.engine import ShardedState
from ..state.partial import NOTHING, Exclusion

__all__ = ["TrainingObjects", "ShardedState", "ModelStates", "Snapshot", "RankFiles", "WritePlan", "LoadedStep",
           "Applied", "RestoredCheckpoint", "COMPONENTS"]

#: Replicated components written by rank 0, one file each, in this order.
COMPONENTS = ("optimizer", "scheduler", "scaler", "extra", "meta")


@dataclass
class TrainingObjects:
    """The live objects a save reads from and a restore writes into (as the user passed them).

    ``model`` is one module or a dict name -> module; ``rank_state`` is this
    rank's own state (a dict, or a callable returning one); ``exclude`` is what
    a restore leaves untouched (``restore(exclude=...)``).
    """

    model: Union[nn.Module, Mapping[str, nn.Module]]
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    extra: Optional[Mapping[str, Any]] = None
    rank_state: Any = None
    exclude: Exclusion = NOTHING


@dataclass
class ModelStates:
    """The weights of the step's model(s), as collected for a save or read back by a restore.

    Attributes:
        single: The model was passed as one module (stored as ``model.safetensors``)
            rather than as a dict name -> module (``model-<name>.safetensors`` each).
        states: Name (``'model'`` for a single one) -> ``(bare state dict, module metadata)``.
    """

    single: bool
    states: Dict[str, Tuple[Mapping[str, Any], Dict[str, Any]]]


@dataclass
class Snapshot:
    """What one rank collected for a save: live tensors, or their staged copies for an async save.

    Attributes:
        step: The step being saved.
        rng: This rank's RNG streams (every rank writes its own file).
        model: The model weights; rank 0 of a plain save only.
        components: Trees of :data:`COMPONENTS` (None when not given); rank 0 only.
        metrics: Metrics for the manifest; rank 0 only.
        sharded: Model and optimizer state through DCP (every rank), for a sharded save.
        frozen: Per model, ``{key: shape}`` of the frozen parameters left out (``save_frozen=False``).
        rank_state: This rank's own state (every rank writes its own file), or None.
    """

    step: int
    rng: Dict[str, Any]
    model: Optional[ModelStates] = None
    components: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    sharded: Optional[ShardedState] = None
    frozen: Optional[Dict[str, Dict[str, List[int]]]] = None
    rank_state: Optional[Dict[str, Any]] = None


@dataclass
class RankFiles:
    """The files one rank wrote for a step, reported to rank 0 for the manifest.

    Attributes:
        files: Name (relative to the step directory) -> size and checksum.
        components: Component -> file name (rank 0's report), plus ``'sharded'``'s record.
        rng: This rank's RNG file.
        rank_state: This rank's rank-state file, or None.
    """

    files: Dict[str, FileEntry]
    components: Dict[str, Any]
    rng: str
    rank_state: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        """The record as JSON (it travels through the save's all-gather)."""
        return {"files": {n: [e.size, e.digest] + ([e.part_size, list(e.parts)] if e.parts else [])
                          for n, e in self.files.items()}, "components": self.components,
                "rng": self.rng, "rank_state": self.rank_state}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RankFiles":
        """Rebuild a record sent by :meth:`to_json`."""
        rank_state = data.get("rank_state")
        return cls({n: FileEntry(int(e[0]), str(e[1]), *((tuple(e[3]), int(e[2])) if len(e) > 2 else ()))
                    for n, e in data["files"].items()},
                   dict(data["components"]), str(data["rng"]), None if rank_state is None else str(rank_state))


@dataclass
class WritePlan:
    """Where one save writes (rank 0 prepares it and sends it to the other ranks as JSON).

    Names are relative to the manager directory.

    Attributes:
        final: The step directory once committed.
        write_dir: The directory the data files are written into.
        prefix: Prefix of every file name relative to ``final`` (``'rev-<id>/'`` when
            replacing a committed step on an object store, else empty).
        replace: A directory of that name exists already and is replaced.
    """

    final: str
    write_dir: str
    prefix: str = ""
    replace: bool = False

    @property
    def root(self) -> str:
        """The directory that file names (``prefix`` included) are relative to while writing."""
        return self.final if self.prefix else self.write_dir

    def to_json(self) -> Dict[str, Any]:
        """The plan as JSON."""
        return asdict(self)


@dataclass
class LoadedStep:
    """What a restore read from a step and checked against its manifest; nothing is applied yet.

    Attributes:
        manifest: The step's manifest.
        uri: The step directory.
        model: The weights of a plain step (None for a sharded one).
        components: Component -> state, None when the step has none.
        rng: This rank's RNG state, None when the step has none for this rank.
        rank_state: This rank's rank state, None when the step has none for this rank.
        rank_state_skipped: The world size changed and the caller chose to skip rank state.
    """

    manifest: Manifest
    uri: str
    model: Optional[ModelStates] = None
    components: Dict[str, Any] = field(default_factory=dict)
    rng: Optional[Dict[str, Any]] = None
    rank_state: Optional[Dict[str, Any]] = None
    rank_state_skipped: bool = False

    def get(self, component: str) -> Any:
        """The state of one component, or None."""
        return self.components.get(component)


@dataclass
class Applied:
    """What applying a step handed back besides the live objects it loaded.

    Attributes:
        extra: The saved ``extra`` values (stateful targets as themselves, loaded).
        rank_state: This rank's saved rank state, likewise.
    """

    extra: Dict[str, Any] = field(default_factory=dict)
    rank_state: Dict[str, Any] = field(default_factory=dict)


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
        rank_state: This rank's saved ``rank_state`` (objects passed in
            ``rank_state`` are returned as themselves, loaded); empty when
            the step has none or it was skipped after a world size change.
    """

    step: int
    extra: Dict[str, Any] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    path: str = ""
    rank_state: Dict[str, Any] = field(default_factory=dict)


def all_files(reports: List[RankFiles]) -> Dict[str, FileEntry]:
    """Every file every rank wrote (rank order)."""
    return {name: entry for report in reports for name, entry in report.files.items()}
