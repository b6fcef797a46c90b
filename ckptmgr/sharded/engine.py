"""Sharded state through torch.distributed.checkpoint (DCP): collected, saved and loaded on every rank.

A model sharded with FSDP2 (``fully_shard``) or tensor parallelism does not
fit on one rank, so rank 0 cannot gather and write it. Here every rank writes
its own shards of the model and optimizer state with DCP
(``get_state_dict``/``dcp.save``; ``dcp.load``/``set_state_dict`` on restore)
into the step directory it is given; the step layer hashes them into the
manifest and commits them like any other file. DCP reshards on load, so N
ranks' checkpoint restores on M ranks.

Trust: DCP's metadata file is a pickle. It is unpickled only after its bytes
match the manifest, and only with an allowlist unpickler (:mod:`.safe_pickle`),
so a forged file cannot run code even with a recomputed manifest; non-tensor
entries are read with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..errors import CheckpointFormatError, CorruptCheckpointError, KeyMismatchError
from ..format.checksum import DEFAULT_CHECKSUM, FileEntry
from ..format.manifest import Manifest, verify_file
from ..io.store import Store
from ..state.models import as_models, dcp_module
from ..state.objects import as_named
from .layout import METADATA_NAME, check_metadata_bytes, is_data_file
from .safe_pickle import load_metadata

logger = logging.getLogger(__name__)

__all__ = ["ShardedState", "collect", "Stager", "save_shards", "check_files", "metadata_name", "dcp_load",
           "load_into"]


@dataclass
class ShardedState:
    """A sharded save's DCP state: ``{'model': ..., 'optimizer': {name: ...}}`` and how models and optimizers
    were passed."""

    dcp: Dict[str, Any]
    optimizer: Optional[Dict[str, Any]]  # {'single': bool, 'names': [...]}, or None without optimizers
    models: Optional[List[str]] = None  # the names of a dict of models (None: one model)


def _dcp() -> Any:
    """ckptmgr's DCP glue, imported on first use: DCP pulls in DTensor and sympy (about 1 s)."""
    from . import dcp_io
    return dcp_io


def dcp_state(model: nn.Module, optimizer: Any, options: Any = None) -> Dict[str, Any]:
    """``{'model': ..., 'optimizer': {name: ...}}`` as DCP state dicts (DTensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    out: Dict[str, Any] = {"model": get_model_state_dict(model, options=options)}
    named = as_named(optimizer, "optimizer")
    if named is not None:
        out["optimizer"] = {name: get_optimizer_state_dict(model, opt, options=options)
                            for name, opt in named[1].items()}
    return out


def collect(model: Any, optimizer: Any) -> ShardedState:
    """This rank's shards of the model(s) and optimizer state (every rank calls it: FSDP1's is a collective).

    ``model`` is one module or a dict name -> module (saved as one
    ``nn.ModuleDict``, so its keys start with the model's name).
    """
    named = as_named(optimizer, "optimizer")
    single, models = as_models(model)
    return ShardedState(dcp_state(dcp_module(model), optimizer),
                        None if named is None else {"single": named[0], "names": sorted(named[1])},
                        None if single else sorted(models))


class Stager:
    """CPU copies of DCP state for async saves, through DCP's public ``BlockingAsyncStager``.

    With CUDA, the stager caches one pinned copy and refills it on every save
    (re-created when the state's layout changes). Without CUDA its cache
    cannot be used (it pins memory unconditionally, which needs a CUDA
    driver), so each save gets a fresh CPU copy, freed once that save is written.
    """

    def __init__(self) -> None:
        self._stager: Any = None
        self._layout: Any = None

    def stage(self, state: ShardedState) -> ShardedState:
        """A copy of ``state`` that training may not change."""
        from torch.distributed.checkpoint.staging import BlockingAsyncStager
        cached = torch.cuda.is_available()
        if self._stager is None or (cached and not _same_layout(self._layout, state.dcp)):
            self._stager = BlockingAsyncStager(cache_staged_state_dict=cached)
            self._layout = state.dcp
        return ShardedState(self._stager.stage(state.dcp), state.optimizer, state.models)

    def release(self) -> None:
        """Drop the cached copy."""
        self._stager = None
        self._layout = None


def _same_layout(a: Any, b: Any) -> bool:
    """True when two state trees have the same keys and tensor shapes/dtypes (so a cached copy fits)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_layout(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and type(a) is type(b)
                and a.shape == b.shape and a.dtype == b.dtype)
    return True


def save_shards(store: Store, state: ShardedState, rank: int, group: Any = None,
                checksum: str = DEFAULT_CHECKSUM) -> Dict[str, FileEntry]:
    """Write this rank's shards with ``dcp.save`` (a collective on ``group``) into ``store``.

    Returns:
        The files this rank wrote (rank 0 also DCP's metadata), relative to
        ``store``, with sizes and checksums taken while they were written.

    Raises:
        DistributedError: DCP failed on some rank (every rank raises).
    """
    import torch.distributed.checkpoint as dcp
    io = _dcp()
    out = io.writer(store, checksum)
    try:
        with warnings.catch_warnings():  # one process without torch.distributed: DCP warns, we mean it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state.dcp, storage_writer=out, process_group=group)
    except BaseException as exc:  # CheckpointException is a BaseException; agreement catches Exception only
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise io.translate(exc, f"writing DCP shards into {store.root}") from None
    own = [n for n in out.written if is_data_file(n, rank)] + ([METADATA_NAME] if rank == 0 else [])
    return io.written_entries(out, store, own, checksum)


def metadata_name(manifest: Manifest, source: str) -> str:
    """The manifest's name for DCP's metadata file.

    Raises:
        CorruptCheckpointError: the manifest lists none.
    """
    name = manifest.components["sharded"].get("metadata")
    if not isinstance(name, str) or not name.endswith(METADATA_NAME) or name not in manifest.files:
        raise CorruptCheckpointError(f"{source}: the manifest lists no DCP metadata file")
    return name


def check_files(store: Store, manifest: Manifest, full: bool) -> None:
    """Check DCP's files of a step against its manifest: the metadata always, every data file with ``full``.

    Sizes are checked by the caller's listing. The metadata is a pickle, so it
    is hashed even when the caller skips checksums (``verify=False``), and read
    with the allowlist unpickler here, so a step whose metadata would need
    anything else is refused while a restore still chooses its step.

    Raises:
        ChecksumError, CorruptCheckpointError: a file differs or is missing.
        UnsafeCheckpointError: the metadata names something outside the allowlist.
    """
    name = metadata_name(manifest, store.root)
    raw = store.read_bytes(name)
    check_metadata_bytes(raw, manifest.files[name], store.root, manifest.checksum)
    load_metadata(raw, store.uri(name))
    if full:
        for data in sorted(n for n in manifest.files if is_data_file(n)):
            verify_file(store, data, manifest.files[data], manifest.checksum)


def dcp_load(target: Dict[str, Any], store: Store, manifest: Manifest, planner: Any, group: Any,
             no_dist: bool = False) -> None:
    """``dcp.load`` into ``target`` through the verifying reader; DCP's errors become ckptmgr errors."""
    import torch.distributed.checkpoint as dcp
    io = _dcp()
    name = metadata_name(manifest, store.root)
    prefix = name[: -len(METADATA_NAME)]
    rd = io.reader(store.sub(prefix) if prefix else store, manifest.files[name], store.uri(name), manifest.checksum)
    try:
        if no_dist:  # dcp.load would copy into a new dict, losing what an empty-dict planner builds
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
            _load_state_dict(target, storage_reader=rd, planner=planner, no_dist=True)
        else:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(target, storage_reader=rd, planner=planner, process_group=group)
    except BaseException as exc:  # DCP raises CheckpointException, a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        error = io.translate(exc, f"loading DCP shards from {store.root}")
        if "Missing key" in str(error):
            raise KeyMismatchError(f"{store.root}: the model or optimizer has keys the checkpoint lacks: {error}") \
                from None
        raise error from None


def _check_optimizers(saved: Optional[Mapping[str, Any]], named: Any, strict: bool) -> bool:
    """True when optimizer state is to be loaded; raise when the caller's optimizers do not match the saved ones."""
    if named is None:
        return False
    if saved is None:
        if strict:
            raise CheckpointFormatError("the checkpoint holds no optimizer state",
                                        "pass optimizer=None, or strict=False to skip it")
        logger.warning("the checkpoint holds no optimizer state; optimizer left as it is")
        return False
    single, objs = named
    if bool(saved.get("single")) != single or not set(objs) <= set(saved.get("names") or []):
        raise CheckpointFormatError(f"optimizer was saved as {saved}, restored as "
                                    f"{'one object' if single else sorted(objs)}",
                                    "pass optimizer the same way it was passed to save()")
    return True


def _check_models(saved: Any, model: Any) -> None:
    """Raise when the live model(s) are not passed as they were saved (one module, or a dict with these names)."""
    single, models = as_models(model)
    if saved is None and single:
        return
    if saved is None or single:
        have = "one module" if saved is None else f"a dict of models {saved}"
        raise CheckpointFormatError(f"the model was saved as {have} but is restored into "
                                    f"{'one module' if single else 'a dict'}",
                                    "pass model the same way it was passed to save()")
    missing = sorted(set(models) - set(saved))
    if missing:
        raise CheckpointFormatError(f"the checkpoint has no model named {missing}; it has {sorted(saved)}",
                                    "use the names passed to save() for model")


def load_into(store: Store, manifest: Manifest, model: Any, optimizer: Any, strict: bool,
              group: Any = None) -> None:
    """Load a sharded step's model(s) and optimizer into live objects (a collective: every rank calls it).

    They are loaded with ``dcp.load`` into their current sharding (any number
    of ranks, or one process with a plain model), then set with ``set_state_dict``.

    Raises:
        ChecksumError: DCP's metadata differs from the manifest (nothing was unpickled).
        KeyMismatchError: ``strict`` and model or optimizer keys differ.
        CheckpointFormatError: models or optimizers passed differently from the save.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    _check_models(manifest.components["sharded"].get("models"), model)
    model = dcp_module(model)
    named = as_named(optimizer, "optimizer")
    with_optim = _check_optimizers(manifest.components["sharded"].get("optimizer"), named, strict)
    options = StateDictOptions(strict=strict)
    target = dcp_state(model, optimizer if with_optim else None, options)
    dcp_load(target, store, manifest, _dcp().SafeLoadPlanner(allow_partial_load=not strict), group)
    set_model_state_dict(model, target["model"], options=options)
    if with_optim and named is not None:
        for name, opt in named[1].items():
            set_optimizer_state_dict(model, opt, target["optimizer"][name], options=options)
