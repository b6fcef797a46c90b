"""Sharded checkpoints: FSDP2 / DTensor models saved by every rank through torch.distributed.checkpoint.

A model sharded with FSDP2 (``fully_shard``) or tensor parallelism does not
fit on one rank, so rank 0 cannot gather and write it. Here every rank writes
its own shards of the model and optimizer state with DCP
(``get_state_dict``/``dcp.save``; ``dcp.load``/``set_state_dict`` on restore),
into the same step directory and under the same commit protocol as an
unsharded checkpoint: DCP's files are data files of the step, each rank hashes
its own and reports them through the save's agreement, and rank 0 writes the
manifest last. Schedulers, scaler, extra, meta and the per-rank RNG keep their
usual files. DCP reshards on load, so N ranks' checkpoint restores on M ranks,
or into a plain model in one process (:func:`consolidate`).

Trust: DCP's metadata file is a pickle. ckptmgr checks its sha256 against the
manifest before unpickling it, and reads the non-tensor entries of the data
files without pickle code; but a manifest is a checksum, not a signature:
whoever can write the checkpoint can write a matching manifest. A sharded
checkpoint is only as trustworthy as its source. Load only checkpoints you or
your own jobs wrote; share weights as a single safetensors file (:func:`export`).
"""
from __future__ import annotations

import logging
import sys
import warnings
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from . import components, dist, state, storage
from .errors import CheckpointFormatError, CorruptCheckpointError, KeyMismatchError
from .manifest import Manifest, check_sizes, verify_file

logger = logging.getLogger(__name__)

__all__ = ["SETTINGS", "check_setting", "has_dtensors", "use_sharded", "is_sharded", "collect", "Stager",
           "write_rank_files", "check_files", "apply_loaded", "consolidate", "export"]

SETTINGS = ("auto", True, False)
Options = Optional[Dict[str, Any]]
FORMAT = "torch.distributed.checkpoint"


def _dcp() -> Any:
    """ckptmgr's DCP storage glue, imported on first use: DCP pulls in DTensor and sympy (about 1 s)."""
    from . import dcp_storage
    return dcp_storage


def check_setting(value: Any) -> Any:
    """Validate ``CheckpointManager(sharded=...)``.

    Raises:
        ValueError: not ``'auto'``, True or False.
    """
    if value == "auto" and isinstance(value, str) or value is True or value is False:
        return value
    raise ValueError(f"sharded must be 'auto', True or False, got {value!r}")


def has_dtensors(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before its module is imported
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def use_sharded(setting: Any, model: nn.Module) -> bool:
    """Whether a save writes model and optimizer with DCP (``setting``: ``'auto'``, True or False)."""
    return setting is True or (setting == "auto" and has_dtensors(model))


def is_sharded(manifest: Manifest) -> bool:
    """True for a checkpoint whose model and optimizer are DCP files."""
    return isinstance(manifest.components.get("sharded"), Mapping)


# --------------------------------------------------------------------------- save


def _dcp_state(model: nn.Module, optimizer: Any, options: Any = None) -> Dict[str, Any]:
    """``{'model': ..., 'optimizer': {name: ...}}`` as DCP state dicts (DTensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    out: Dict[str, Any] = {"model": get_model_state_dict(model, options=options)}
    named = state.as_named(optimizer, "optimizer")
    if named is not None:
        out["optimizer"] = {name: get_optimizer_state_dict(model, opt, options=options)
                            for name, opt in named[1].items()}
    return out


def collect(step: int, *, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
            extra: Optional[Mapping[str, Any]], metrics: Optional[Mapping[str, Any]],
            meta: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """This rank's share of a sharded save: DCP state and RNG on every rank, the rest on rank 0.

    Returns:
        A snapshot for :func:`write_rank_files`: ``dcp`` (model and optimizer
        state dicts), ``sharded`` (how the optimizer was passed), ``rng``, and
        on rank 0 the components :func:`ckptmgr.components.write_rank_files` writes.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    named = state.as_named(optimizer, "optimizer")
    snapshot: Dict[str, Any] = {
        "rng": state.rng_state(distributed=world > 1), "dcp": _dcp_state(model, optimizer),
        "sharded": {"optimizer": None if named is None else {"single": named[0], "names": sorted(named[1])}}}
    if rank == 0:
        snapshot.update(metrics=state.clean_metrics(metrics), meta=state.build_meta(meta, step, world),
                        extra=state.extra_state(extra), scheduler=state.named_state(scheduler, "scheduler", prune=True),
                        scaler=state.named_state(scaler, "scaler"))
    return snapshot


class Stager:
    """CPU copies of DCP state for async saves, allocated once and refilled (DCP's own staging helpers).

    DTensors are copied shard by shard into CPU DTensors with the same
    placement, which is what ``dcp.async_save``'s stager does.
    """

    def __init__(self) -> None:
        self._cache: Optional[Dict[str, Any]] = None

    def stage(self, snapshot: Mapping[str, Any], buffers: Any) -> Dict[str, Any]:
        """Copy ``snapshot``: its ``dcp`` part here, everything else through ``buffers`` (StagingBuffers)."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
        rest = buffers.stage_tree({k: v for k, v in snapshot.items() if k != "dcp"})
        live = snapshot["dcp"]
        if self._cache is None or not _same_layout(self._cache, live):
            self._cache = _create_cpu_state_dict(live, pin_memory=torch.cuda.is_available())
        rest["dcp"] = _copy_state_dict(live, self._cache)
        return rest

    def release(self) -> None:
        """Drop the cached copy."""
        self._cache = None


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


def write_rank_files(plan: Any, snap: Mapping[str, Any], rank: int, storage_options: Options = None,
                     group: Any = None) -> Dict[str, Any]:
    """Write this rank's shards with ``dcp.save`` (a collective on ``group``), then its component files.

    Args:
        plan: The save's :class:`ckptmgr.stepdir.WritePlan`; DCP writes into ``plan.write_dir``.
        snap: From :func:`collect` (staged or live).
        rank: This rank.
        storage_options: fsspec options.
        group: Process group for DCP's collectives (None: the default group).

    Returns:
        Like :func:`ckptmgr.components.write_rank_files`, with this rank's DCP
        files (and, on rank 0, DCP's metadata) added to ``files``, sizes and sha256
        read back from storage.

    Raises:
        DistributedError: DCP failed on some rank (every rank raises).
    """
    import torch.distributed.checkpoint as dcp
    what = f"writing DCP shards into {plan.write_dir}"
    out = _dcp().writer(plan.write_dir, storage_options)
    try:
        with warnings.catch_warnings():  # one process without torch.distributed: DCP warns, we mean it
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(snap["dcp"], storage_writer=out, process_group=group)
    except BaseException as exc:  # CheckpointException is a BaseException; agreement catches Exception only
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise _dcp().translate(exc, what) from None
    reply = components.write_rank_files(plan.root, plan.prefix, snap, rank, storage_options)
    own = [n for n in out.written if _dcp().is_data_file(n, rank)] + ([_dcp().METADATA_NAME] if rank == 0 else [])
    for name, entry in _dcp().hash_files(plan.write_dir, own, storage_options).items():
        reply["files"][plan.prefix + name] = [entry.size, entry.sha256]
    if rank == 0:
        reply["components"]["sharded"] = {"format": FORMAT, "metadata": plan.prefix + _dcp().METADATA_NAME,
                                          "world_size": dist.get_world_size(),
                                          "optimizer": snap["sharded"]["optimizer"], "torch_version": torch.__version__}
    return reply


# --------------------------------------------------------------------------- restore


def _metadata_name(manifest: Manifest, source: str) -> str:
    name = manifest.components["sharded"].get("metadata")
    if not isinstance(name, str) or not name.endswith(_dcp().METADATA_NAME) or name not in manifest.files:
        raise CorruptCheckpointError(f"{source}: the manifest lists no DCP metadata file")
    return name


def check_files(step_uri: str, manifest: Manifest, full: bool, storage_options: Options = None) -> None:
    """Check DCP's files against the manifest: the metadata's sha256 always, every data file's with ``full``.

    Sizes are checked by the caller's listing. The metadata is a pickle, so it
    is hashed even when the caller skips sha256 checks (``verify=False``).

    Raises:
        ChecksumError, CorruptCheckpointError: a file differs or is missing.
    """
    name = _metadata_name(manifest, step_uri)
    with storage.open_read(storage.join(step_uri, name), storage_options) as fh:
        _dcp().check_metadata_bytes(fh.read(), manifest.files[name], step_uri)
    if full:
        for data in sorted(n for n in manifest.files if _dcp().is_data_file(n)):
            verify_file(storage.join(step_uri, data), data, manifest.files[data], step_uri, storage_options)


def _dcp_load(target: Dict[str, Any], step_uri: str, manifest: Manifest, planner: Any,
              storage_options: Options, group: Any, no_dist: bool = False) -> None:
    """``dcp.load`` into ``target`` through the verifying reader; DCP's errors become ckptmgr errors."""
    import torch.distributed.checkpoint as dcp
    name = _metadata_name(manifest, step_uri)
    prefix = name[: -len(_dcp().METADATA_NAME)]
    source = storage.join(step_uri, name)
    rd = _dcp().reader(storage.join(step_uri, prefix) if prefix else step_uri, manifest.files[name], source, storage_options)
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
        error = _dcp().translate(exc, f"loading DCP shards from {step_uri}")
        if "Missing key" in str(error):
            raise KeyMismatchError(f"{step_uri}: the model or optimizer has keys the checkpoint lacks: {error}") \
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


def apply_loaded(loaded: Mapping[str, Any], step_uri: str, model: nn.Module, optimizer: Any, scheduler: Any,
                 scaler: Any, extra: Optional[Mapping[str, Any]], strict: bool, storage_options: Options = None,
                 group: Any = None) -> Dict[str, Any]:
    """Load a sharded step into live objects (a collective: every rank calls it); RNG last.

    The model and optimizer are loaded with ``dcp.load`` into their current
    sharding (any number of ranks, or one process with a plain model), then
    set with ``set_state_dict``; the rest comes from ``loaded``
    (:func:`ckptmgr.components.read_step`).

    Returns:
        The restored extra values.

    Raises:
        ChecksumError: DCP's metadata differs from the manifest (nothing was unpickled).
        KeyMismatchError: ``strict`` and model or optimizer keys differ.
        CheckpointFormatError: optimizers passed differently from the save.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    manifest: Manifest = loaded["manifest"]
    named = state.as_named(optimizer, "optimizer")
    with_optim = _check_optimizers(manifest.components["sharded"].get("optimizer"), named, strict)
    options = StateDictOptions(strict=strict)
    target = _dcp_state(model, optimizer if with_optim else None, options)
    _dcp_load(target, step_uri, manifest, _dcp().SafeLoadPlanner(allow_partial_load=not strict), storage_options, group)
    set_model_state_dict(model, target["model"], options=options)
    if with_optim:
        for name, opt in named[1].items():
            set_optimizer_state_dict(model, opt, target["optimizer"][name], options=options)
    state.apply_named(scheduler, loaded.get("scheduler"), "scheduler", strict)
    state.apply_named(scaler, loaded.get("scaler"), "scaler", strict)
    values = state.apply_extra(extra, loaded.get("extra"))
    if loaded.get("rng") is not None:
        state.apply_rng(loaded["rng"])
    else:
        logger.warning("step %d has no RNG state for this rank (saved with %d ranks); RNG not restored",
                       manifest.step, manifest.world_size)
    return values


# --------------------------------------------------------------------------- consolidation


def consolidate(step_uri: str, storage_options: Options = None, verify: bool = True,
                optimizer: bool = False) -> "OrderedDict[str, Any]":
    """The full (unsharded) model state dict of a sharded step, in this process, without a process group.

    Args:
        step_uri: A committed sharded step directory (``.../step_00000100``).
        storage_options: fsspec options for URLs.
        verify: Check every file's sha256 (sizes and the metadata's sha256 are always checked).
        optimizer: Return ``{'model': ..., 'optimizer': {name: ...}}`` instead of the model state dict.

    Returns:
        Bare model keys -> full CPU tensors (or the dict above).

    Raises:
        CheckpointNotFoundError: no manifest (the step never committed).
        CheckpointFormatError: the step is not sharded.
        ChecksumError, CorruptCheckpointError: a file differs from the manifest.
    """
    step_uri = step_uri.rstrip("/") or step_uri
    manifest = components.read_manifest(step_uri, storage_options)
    if not is_sharded(manifest):
        raise CheckpointFormatError(f"{step_uri} is not a sharded checkpoint",
                                    "load it with ckptmgr.load_checkpoint or CheckpointManager.restore")
    check_sizes(manifest, storage.list_files(step_uri, storage_options), step_uri)
    check_files(step_uri, manifest, verify, storage_options)
    target: Dict[str, Any] = {}
    keys = None if optimizer else {"model"}
    _dcp_load(target, step_uri, manifest, _dcp().SafeEmptyLoadPlanner(keys=keys), storage_options, None, no_dist=True)
    model = OrderedDict(target.get("model") or {})
    return model if not optimizer else {"model": model, "optimizer": target.get("optimizer") or {}}


def export(step_uri: str, dst: str, storage_options: Options = None, verify: bool = True) -> str:
    """Write the consolidated model weights of a sharded step as one file: safetensors unless ``dst`` ends in .pth/.pt.

    Args:
        step_uri: A committed sharded step directory.
        dst: Destination path or URL; ``.safetensors`` is appended when it has no known extension.
        storage_options: fsspec options for ``step_uri`` and ``dst``.
        verify: As for :func:`consolidate`.

    Returns:
        The path written.
    """
    from .serialization import save_torch, write_safetensors
    weights = consolidate(step_uri, storage_options, verify)
    if not dst.endswith((".safetensors", ".pth", ".pt")):
        dst = f"{dst}.safetensors"
    tensors = {k: v.contiguous() for k, v in weights.items() if isinstance(v, torch.Tensor)}
    with storage.atomic_write(dst, storage_options) as fh:
        if dst.endswith(".safetensors"):
            write_safetensors(fh, tensors, {"format": "pt"})
        else:
            save_torch({"state_dict": tensors}, fh)
    return dst
