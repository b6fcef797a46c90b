"""Export: a checkpoint's weights as one file, or as a Hugging Face-style directory of safetensors shards.

Training checkpoints hold optimizer state, RNG streams and a directory of
files; inference servers and the Hugging Face world want the weights, often
in a smaller dtype, as ``model-00001-of-0000N.safetensors`` shards plus
``model.safetensors.index.json`` (:mod:`ckptmgr.format.hf_layout`). Any
source a loader reaches works (a file, a manager directory's newest good
step, a step directory, sharded or not, a zoo name); every file is written by
the one single-file writer (:mod:`ckptmgr.format.checkpoint_file`).

A destination appears complete or not at all. One file is an atomic write. A
local directory is written into ``.NAME.tmp-<id>`` beside it and renamed into
place (a kill leaves only that temporary directory, which the next export of
the same name removes); on an object store, where a prefix cannot be renamed,
the shards go first and the index last: without its index the directory is
not an export.
"""
from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .checkpoint import extract_state_dict
from .describe import jsonable
from .errors import CheckpointExistsError, CheckpointFormatError, UnserializableStateError
from .faults import fault_point
from .format.checkpoint_file import write_checkpoint_file
from .format.hf_layout import INDEX_NAME, build_index, parse_size, plan_shards, shard_name
from .format.skeleton import to_skeleton
from .inventory import is_manager_path, is_step_dir
from .io.access import open_store
from .io.local import LocalStore
from .io.store import Options, Store
from .loaders.directory import load_manager_checkpoint
from .loaders.registry import CheckpointLoader
from .state.cast import cast_floating, parse_dtype
from .step.files import read_component, read_manifest
from .step.names import step_name

logger = logging.getLogger(__name__)

__all__ = ["WEIGHT_SUFFIXES", "OPTIMIZER_NAME", "Written", "kind_for", "layout_of", "plain_meta", "storable",
           "export"]

#: Destination endings of one file and the format each writes.
WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".pth": "torch", ".pt": "torch", ".bin": "torch", ".ckpt": "torch"}
#: The optimizer state in a directory export (``include_optimizer=True``).
OPTIMIZER_NAME = "optimizer.safetensors"
_EXTENSION = re.compile(r"\.(?=[0-9]*[A-Za-z])[A-Za-z0-9]{1,8}$")  # "w.txt" has one; "llama-3.1" has none

Fill = Callable[[IO[bytes]], Any]


@dataclass
class Written:
    """What :func:`export` (or ``convert``/``publish``) wrote.

    Attributes:
        path: The file or directory written.
        size: Bytes written (every file of a directory).
        entries: State-dict entries exported.
        sha256: The file's sha256 (``publish`` only).
        files: Names of the files written (a directory's shards, index and optimizer file).
    """

    path: str
    size: int
    entries: int
    sha256: str = ""
    files: List[str] = field(default_factory=list)


def kind_for(dst: str) -> str:
    """The format a destination file name asks for.

    Raises:
        ValueError: the name ends in none of :data:`WEIGHT_SUFFIXES`.
    """
    for suffix, kind in WEIGHT_SUFFIXES.items():
        if dst.endswith(suffix):
            return kind
    raise ValueError(f"{dst}: the destination must end in {', '.join(WEIGHT_SUFFIXES)}")


def layout_of(dst: str, max_shard_size: Any = None, storage_options: Options = None) -> str:
    """``'file'`` for a name ending in :data:`WEIGHT_SUFFIXES`, ``'directory'`` for the Hugging Face layout.

    A directory is a name without a file extension, a name ending in ``/``, or an existing directory.

    Raises:
        ValueError: the name has another extension, or ``max_shard_size`` is given for one file.
    """
    if dst.endswith(tuple(WEIGHT_SUFFIXES)):
        if max_shard_size is not None:
            raise ValueError(f"{dst}: max_shard_size (--max-shard-size) writes a directory of shards; give a "
                             "directory name without an extension")
        return "file"
    last = dst.rstrip("/").rsplit("/", 1)[-1]
    if dst.endswith("/") or not _EXTENSION.search(last) or open_store(dst, storage_options).isdir():
        return "directory"
    raise ValueError(f"{dst}: end the name in {', '.join(WEIGHT_SUFFIXES)} for one file, or give a directory "
                     "name (no extension, or a trailing /) for safetensors shards and an index")


def plain_meta(meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Meta that any loader can read back without pickle (JSON values only)."""
    return json.loads(json.dumps(jsonable(meta)))


def _fits(value: Any, tensors_only: bool) -> bool:
    if isinstance(value, torch.Tensor) or tensors_only:
        return isinstance(value, torch.Tensor)
    try:
        to_skeleton(value)
    except UnserializableStateError:
        return False
    return True


def storable(weights: Mapping[str, Any], tensors_only: bool = False) -> "Dict[str, Any]":
    """The entries safetensors can hold (tensors, and with ``tensors_only`` False values JSON can carry).

    The rest is dropped with a warning naming it.
    """
    kept = {k: v for k, v in weights.items() if _fits(v, tensors_only)}
    dropped = [k for k in weights if k not in kept]
    if dropped:
        logger.warning("safetensors %s; not exported: %s",
                       "shards hold tensors only" if tensors_only else "holds tensors and plain values only",
                       ", ".join(map(str, dropped)))
    return kept


# --------------------------------------------------------------------------- reading the source


def _manager_optimizer(src: str, step: int) -> Any:
    """The optimizer state of a manager checkpoint, as ``save_checkpoint`` stores it (one dict, or name -> dict)."""
    store = open_store(src.rstrip("/") or src)
    root = store if is_step_dir(src) else store.sub(step_name(step))
    manifest = read_manifest(root)
    sharded = manifest.components.get("sharded")
    if isinstance(sharded, dict):
        from .sharded.consolidate import consolidate
        states = consolidate(root, optimizer=True)["optimizer"]
        single = bool((sharded.get("optimizer") or {}).get("single"))
    else:
        name = manifest.file_for("optimizer")
        saved = None if name is None else read_component(root, manifest, name, True, "cpu")
        states, single = (saved or {}).get("states"), bool((saved or {}).get("single"))
    if not states:
        return None
    return next(iter(states.values())) if single and len(states) == 1 else dict(states)


def read_source(src: str, trust_pickle: bool = False, optimizer: bool = False
                ) -> Tuple[Mapping[str, Any], Dict[str, Any], Any]:
    """``(state dict, meta, optimizer state or None)`` of any checkpoint a loader reaches.

    Raises:
        CheckpointFormatError: no model state dict, or ``optimizer`` and the source holds no optimizer state.
        UnsafeCheckpointError: it needs pickle and ``trust_pickle`` is False.
    """
    opt: Any = None
    if is_manager_path(src) and not open_store(src).exists(INDEX_NAME):
        loaded = load_manager_checkpoint(src, map_location="cpu")
        weights, meta = loaded["state_dict"], dict(loaded["meta"], step=loaded["step"])
        opt = _manager_optimizer(src, loaded["step"]) if optimizer else None
    else:
        ckpt = CheckpointLoader.load_checkpoint(src, map_location="cpu", logger="silent", trust_pickle=trust_pickle)
        weights = extract_state_dict(ckpt, src)
        is_dict = isinstance(ckpt, Mapping)
        meta = dict(ckpt["meta"]) if is_dict and isinstance(ckpt.get("meta"), Mapping) else {}
        opt = ckpt.get("optimizer") if is_dict and optimizer else None
    if optimizer and opt is None:
        raise CheckpointFormatError(f"{src} holds no optimizer state", "export without include_optimizer")
    return weights, meta, opt


# --------------------------------------------------------------------------- writing


def _check_free(store: Store, dst: str, force: bool) -> None:
    if force:
        return
    if store.isdir():
        if store.listdir():
            raise CheckpointExistsError(f"{dst} exists and is not empty", "pass force=True (--force) to replace it")
    elif store.exists():
        raise CheckpointExistsError(f"{dst} exists", "pass force=True (--force) to replace it")


def _write_local_directory(dst: LocalStore, files: List[Tuple[str, Fill]]) -> None:
    """Write ``files`` into a temporary directory beside ``dst``, then rename it into place (a swap if it exists)."""
    parent, base = LocalStore(os.path.dirname(dst.root)), os.path.basename(dst.root)
    parent.makedirs()
    for leftover in parent.listdir():  # a killed export of this name left its temporary directory
        if leftover.startswith(f".{base}.tmp-"):
            parent.remove(leftover, recursive=True)
    tmp = f".{base}.tmp-{uuid.uuid4().hex[:12]}"
    parent.make_dir(tmp)
    try:
        work = parent.sub(tmp)
        for name, fill in files:
            with work.atomic_write(name) as fh:
                fill(fh)
            fault_point("export.after_file")
        if parent.exists(base):
            if not parent.exchange_dirs(tmp, base):  # no renameat2: the old copy is gone for an instant
                old = f".{base}.old-{uuid.uuid4().hex[:12]}"
                parent.rename_dir(base, old)
                parent.rename_dir(tmp, base)
                tmp = old
            parent.remove(tmp, recursive=True)  # the replaced export
        else:
            parent.rename_dir(tmp, base)
    except BaseException:
        try:
            parent.remove(tmp, recursive=True)
        except OSError as exc:  # the original error matters more; the next export removes it
            logger.warning("could not remove %s: %s", parent.uri(tmp), exc)
        raise


def _write_remote_directory(dst: Store, files: List[Tuple[str, Fill]]) -> None:
    """Object stores: the index goes last (and is removed first when replacing), so no index means no export."""
    before = set(dst.list_files())
    if INDEX_NAME in before:
        dst.remove(INDEX_NAME)
    written: List[str] = []
    try:
        for name, fill in files:
            with dst.atomic_write(name) as fh:
                fill(fh)
            written.append(name)
            fault_point("export.after_file")
    except BaseException:
        for name in written:
            try:
                dst.remove(name)
            except OSError as exc:
                logger.warning("could not remove %s: %s", dst.uri(name), exc)
        raise
    for stale in sorted(before - set(written)):  # a replaced export's files that this one does not have
        dst.remove(stale)


def _directory_files(weights: Mapping[str, torch.Tensor], meta: Dict[str, Any], optimizer: Any,
                     max_bytes: Optional[int]) -> List[Tuple[str, Fill]]:
    """Shards, then the optimizer file, then the index: the order they are written in."""
    plan = plan_shards(weights, max_bytes)
    if not plan:
        raise CheckpointFormatError("the checkpoint holds no tensors to export", "export a checkpoint with weights")
    files: List[Tuple[str, Fill]] = []
    for i, keys in enumerate(plan):
        shard = {"meta": meta, "state_dict": {k: weights[k] for k in keys}}
        files.append((shard_name(i + 1, len(plan)),
                      lambda fh, shard=shard: write_checkpoint_file(fh, "safetensors", shard)))  # type: ignore[misc]
    if optimizer is not None:
        files.append((OPTIMIZER_NAME, lambda fh: write_checkpoint_file(
            fh, "safetensors", {"meta": meta, "state_dict": {}, "optimizer": optimizer})))
    index = build_index(plan, weights)
    files.append((INDEX_NAME, lambda fh: fh.write(index)))
    return files


def export(source: str, dest: str, *, dtype: Union[None, str, torch.dtype] = None,
           max_shard_size: Union[None, int, str] = None, include_optimizer: bool = False, force: bool = False,
           trust_pickle: bool = False, storage_options: Options = None) -> Written:
    """Write a checkpoint's weights (and meta) as one file, or as safetensors shards with an index.

    Args:
        source: A ``.pth``/``.safetensors`` file, a manager directory (its newest good
            step), a step directory (sharded or not), or any URI a loader handles.
        dest: A name ending in ``.safetensors``/``.pth``/``.pt``/``.bin``/``.ckpt``: one file
            in that format. A directory name (no extension, or a trailing ``/``):
            ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``
            (``{"metadata": {"total_size": ...}, "weight_map": {key: file}}``), the layout
            ``transformers`` and inference servers load.
        dtype: Cast floating-point tensors to this dtype (``'bfloat16'``, ``torch.float16``, ...).
        max_shard_size: Largest shard (``'5GB'``, ``'500MB'``, ``'2GiB'`` or bytes); one shard when None.
        include_optimizer: Export the optimizer state too: in the file's ``optimizer`` entry, or
            as ``optimizer.safetensors`` in a directory (never cast).
        force: Replace ``dest`` if it exists (atomically: the old export stays until the new one is complete).
        trust_pickle: Allow pickle code when reading ``source`` (only for files you trust).
        storage_options: fsspec options for ``dest``.

    Returns:
        What was written.

    Raises:
        ValueError: ``dest`` has an unknown extension, or ``dtype``/``max_shard_size`` is invalid.
        CheckpointExistsError: ``dest`` exists (a non-empty directory) and ``force`` is False.
        CheckpointFormatError: the source holds no weights (or no optimizer state, with ``include_optimizer``).
        StorageError: writing failed; nothing is left under ``dest``.
    """
    dest = os.fspath(dest)
    layout, cast = layout_of(dest, max_shard_size, storage_options), parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    out = open_store(dest, storage_options)
    _check_free(out, dest, force)
    weights, meta, optimizer = read_source(os.fspath(source), trust_pickle, include_optimizer)
    weights, meta = cast_floating(weights, cast), plain_meta(meta)
    if layout == "file":
        kind = kind_for(dest)
        checkpoint: Dict[str, Any] = {"meta": meta, "state_dict": storable(weights) if kind == "safetensors"
                                      else dict(weights)}
        if optimizer is not None:
            checkpoint["optimizer"] = optimizer
        with out.atomic_write() as fh:
            write_checkpoint_file(fh, kind, checkpoint)
        return Written(dest, out.size(), len(weights), files=[dest.rstrip("/").rsplit("/", 1)[-1]])
    tensors = {k: v.contiguous() for k, v in storable(weights, tensors_only=True).items()}
    files = _directory_files(tensors, meta, optimizer, max_bytes)
    if isinstance(out, LocalStore):
        _write_local_directory(out, files)
    else:
        _write_remote_directory(out, files)
    sizes = out.list_files()
    logger.info("exported %d tensors from %s to %s in %d shard(s)", len(tensors), source, dest, len(files) - 1 -
                (optimizer is not None))
    return Written(dest, sum(sizes.get(n, 0) for n, _ in files), len(tensors), files=[n for n, _ in files])
