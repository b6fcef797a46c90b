"""The files of one checkpoint step: what goes in which file, and reading them back verified.

A step holds one file per component (model weights, optimizer, scheduler,
scaler, extra, meta) plus one RNG file per rank. Components without tensors
are JSON; those with tensors are safetensors whose header carries the JSON
structure, and the weights file is a plain safetensors file keyed like the
bare model, readable by any safetensors tool. Files are hashed while they are
written and verified while they are read, so a load checks every byte in the
same pass that parses it. The file kind comes from the manifest's name for it,
never from sniffing, and nothing here can unpickle.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from . import storage
from .faults import fault_point
from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .manifest import (MANIFEST_NAME, FileEntry, HashingReader, HashingWriter, Manifest, check_sizes, compare,
                       step_name, verify_file)
from .serialization import SKELETON_KEY, MapLocation, from_skeleton, read_safetensors, to_skeleton, write_safetensors
from .state import plain

logger = logging.getLogger(__name__)

__all__ = ["COMPONENTS", "write_component", "write_model", "write_rank_files", "read_component", "read_model",
           "read_manifest", "probe", "read_step", "load_weights", "build_manifest"]

COMPONENTS = ("optimizer", "scheduler", "scaler", "extra", "meta")
MODULE_META_KEY = "ckptmgr.module_metadata"
WRITERS = max(2, min(4, os.cpu_count() or 2))  # files of one step written at once
Options = Optional[Dict[str, Any]]


def _write(uri: str, fill: Any, storage_options: Options) -> FileEntry:
    with storage.atomic_write(uri, storage_options) as fh:
        writer = HashingWriter(fh)
        fill(writer)
    fault_point("save.after_data_file")
    return writer.entry()


def write_component(dir_uri: str, base: str, obj: Any, storage_options: Options = None,
                    prefix: str = "") -> Tuple[str, FileEntry]:
    """Write ``obj`` as ``<base>.json`` (no tensors) or ``<base>.safetensors``.

    Returns:
        ``(name relative to the step directory, FileEntry)``.

    Raises:
        UnserializableStateError: ``obj`` holds something that needs pickle.
    """
    skeleton, tensors = to_skeleton(obj, path=base)
    text = json.dumps(skeleton, allow_nan=False)
    if tensors:
        name = f"{prefix}{base}.safetensors"
        entry = _write(storage.join(dir_uri, name),
                       lambda w: write_safetensors(w, tensors, {SKELETON_KEY: text}), storage_options)
    else:
        name = f"{prefix}{base}.json"
        entry = _write(storage.join(dir_uri, name), lambda w: w.write(text.encode("utf-8")), storage_options)
    return name, entry


def write_model(dir_uri: str, state: Mapping[str, Any], module_meta: Mapping[str, Any],
                storage_options: Options = None, prefix: str = "") -> Tuple[str, FileEntry]:
    """Write model weights as a plain safetensors file keyed like the bare model's state dict.

    Any tool that reads safetensors can use the file. Non-tensor entries
    (``get_extra_state``) are kept through a JSON skeleton in the header.
    """
    metadata = {"format": "pt", MODULE_META_KEY: json.dumps(module_meta)}
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        tensors: Mapping[str, torch.Tensor] = state
    else:
        skeleton, tensors = to_skeleton(dict(state), path="model")
        metadata[SKELETON_KEY] = json.dumps(skeleton, allow_nan=False)
    name = f"{prefix}model.safetensors"
    entry = _write(storage.join(dir_uri, name), lambda w: write_safetensors(w, tensors, metadata),
                   storage_options)
    return name, entry


def _read(step_uri: str, manifest: Manifest, name: str, verify: bool, parse: Any,
          storage_options: Options) -> Any:
    """Open one file of the manifest, parse it while hashing, then compare size and sha256."""
    source = step_uri
    want = manifest.files.get(name)
    if want is None:
        raise CorruptCheckpointError(f"{source}: the manifest names {name} as a component but has no entry for it")
    _inside(step_uri, name)

    def check(got: FileEntry) -> None:
        compare(name, got if verify else FileEntry(got.size, want.sha256), want, source)

    try:
        with storage.open_read(storage.join(step_uri, name), storage_options) as fh:
            reader = HashingReader(fh, digest=verify)
            try:
                value = parse(reader, want.size)
            except CorruptCheckpointError:
                check(reader.finish())  # a checksum error explains the damage better
                raise
            check(reader.finish())
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{source}: {name} is listed in the manifest but missing") from exc
    return value


def _inside(step_uri: str, name: str) -> None:
    """Refuse a local file that resolves (through a symlink) outside its step directory."""
    if not storage.is_local(step_uri):
        return
    root = os.path.realpath(storage.local_path(step_uri))
    if not os.path.realpath(os.path.join(root, name)).startswith(root + os.sep):
        raise CorruptCheckpointError(f"{step_uri}: {name} resolves outside the checkpoint directory; refusing to "
                                     "read it", "a step directory holds only its own files: remove the link")


def _parse_json(reader: HashingReader, size: int) -> Any:
    try:
        return json.loads(reader.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"not valid JSON: {exc}") from exc


def read_component(step_uri: str, manifest: Manifest, name: str, verify: bool = True,
                   map_location: MapLocation = None, storage_options: Options = None,
                   into: Optional[Mapping[str, torch.Tensor]] = None) -> Any:
    """Read a component file written by :func:`write_component`, checking it against the manifest.

    ``into`` maps tensor names (as :func:`ckptmgr.serialization.to_skeleton`
    names them) to existing CPU tensors to fill in place when shape and dtype match.

    Raises:
        ChecksumError: size or sha256 differ from the manifest.
        CorruptCheckpointError: the file is missing, malformed, or of an unknown kind.
    """
    if name.endswith(".json"):
        return from_skeleton(_read(step_uri, manifest, name, verify, _parse_json, storage_options), {})
    if not name.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{step_uri}: {name} is neither JSON nor safetensors; refusing to read it")

    def parse(reader: HashingReader, size: int) -> Any:
        tensors, metadata = read_safetensors(reader, size=size, map_location=map_location, into=into)
        if SKELETON_KEY not in metadata:
            return tensors
        try:
            skeleton = json.loads(metadata[SKELETON_KEY])
        except json.JSONDecodeError as exc:
            raise CorruptCheckpointError(f"{name}: structure metadata is not JSON") from exc
        return from_skeleton(skeleton, tensors)
    return _read(step_uri, manifest, name, verify, parse, storage_options)


def read_model(step_uri: str, manifest: Manifest, verify: bool = True, map_location: MapLocation = None,
               storage_options: Options = None,
               into: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple["OrderedDict[str, Any]", Dict[str, Any]]:
    """Read the model weights and module metadata of a step.

    ``into`` maps weight names to existing CPU tensors (the live parameters) to
    fill in place when shape and dtype match, so no second copy is allocated.

    Raises:
        CorruptCheckpointError: no model in the manifest, or the file is damaged.
    """
    name = manifest.file_for("model")
    if name is None or not name.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{step_uri}: the manifest names no model weights file")

    def parse(reader: HashingReader, size: int) -> Any:
        tensors, metadata = read_safetensors(reader, size=size, map_location=map_location, into=into)
        try:
            module_meta = json.loads(metadata.get(MODULE_META_KEY, "{}"))
            state = from_skeleton(json.loads(metadata[SKELETON_KEY]), tensors) if SKELETON_KEY in metadata \
                else tensors
        except json.JSONDecodeError as exc:
            raise CorruptCheckpointError(f"{name}: header metadata is not JSON") from exc
        return OrderedDict(state), module_meta if isinstance(module_meta, dict) else {}
    return _read(step_uri, manifest, name, verify, parse, storage_options)


def read_manifest(step_uri: str, storage_options: Options = None) -> Manifest:
    """Read and self-check the manifest of a step directory.

    Raises:
        CheckpointNotFoundError: there is no manifest (the step never committed).
        CorruptCheckpointError: the manifest is damaged.
    """
    with storage.open_read(storage.join(step_uri, MANIFEST_NAME), storage_options) as fh:
        data = fh.read()
    return Manifest.from_bytes(data, source=storage.join(step_uri, MANIFEST_NAME))


def probe(step_uri: str, storage_options: Options = None) -> str:
    """``'committed'``, ``'damaged'`` (a manifest that does not check out) or ``'absent'``."""
    try:
        read_manifest(step_uri, storage_options)
    except CheckpointNotFoundError:
        return "absent"
    except CorruptCheckpointError:
        return "damaged"
    return "committed"


def write_rank_files(root: str, prefix: str, snap: Mapping[str, Any], rank: int,
                     storage_options: Options = None) -> Dict[str, Any]:
    """Write this rank's share of a step: everything on rank 0, the RNG file on every rank.

    Args:
        root: Directory the names are relative to while writing.
        prefix: Prefix of every file name (``'rev-<id>/'`` for a replaced step on an object store).
        snap: Collected state: ``model`` as ``(state, module_meta)``, the
            :data:`COMPONENTS` (None when not given), and ``rng``.
        rank: This rank.
        storage_options: fsspec options.

    Returns:
        JSON for the commit: ``{'files': {name: [size, sha256]}, 'components': {...}, 'rng': name}``.
    """
    jobs: Dict[str, Any] = {}
    if rank == 0:
        if snap.get("model") is not None:  # a sharded save writes the model through DCP instead
            jobs["model"] = lambda: write_model(root, *snap["model"], storage_options, prefix=prefix)
        for comp in COMPONENTS:
            if snap.get(comp) is not None:
                jobs[comp] = functools.partial(write_component, root, comp, snap[comp], storage_options,
                                               prefix=prefix)
    jobs["rng"] = lambda: write_component(root, f"rng-rank{rank:05d}", snap["rng"], storage_options,
                                          prefix=prefix)
    # Files are independent: write them concurrently (the model and the optimizer
    # moments are the big ones), so copying into the page cache or uploading
    # uses more than one core or connection. Every job finishes before we return.
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="ckptmgr-write") as pool:
        futures = {comp: pool.submit(job) for comp, job in jobs.items()}
        done = {comp: future.result() for comp, future in futures.items()}
    rng_name, rng_entry = done.pop("rng")
    components = {comp: name for comp, (name, _) in done.items()}
    files = dict(done.values())
    files[rng_name] = rng_entry
    if storage.is_local(root):
        storage.fsync_dir(storage.local_path(root))
    return {"files": {n: [e.size, e.sha256] for n, e in files.items()}, "components": components, "rng": rng_name}


def read_step(directory: str, step: int, rank: int, verify: bool = True, map_location: MapLocation = None,
              storage_options: Options = None, check_all: bool = False,
              into: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> Dict[str, Any]:
    """Read (and check) everything ``rank`` needs from a committed step; nothing is applied.

    Sizes of every file are compared with one listing first; each file read
    is then hashed in the same pass (``verify``). With ``check_all`` the other
    ranks' RNG files are verified too, so one reader can vouch for the step.
    ``into`` maps ``'model'`` and component names to tensors to read into in
    place (see :func:`ckptmgr.state.inplace_targets`); those tensors then hold
    the step's bytes even if a later check fails.

    Returns:
        ``{'manifest', 'model': (weights, module_meta), <component>: state or None, 'rng': state or None}``.

    Raises:
        CheckpointNotFoundError: the step has no manifest.
        ChecksumError, CorruptCheckpointError: something differs from the manifest.
    """
    uri = storage.join(directory, step_name(step))
    try:
        manifest = read_manifest(uri, storage_options)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"step {step} has no committed checkpoint in {directory}") from None
    if manifest.step != step:
        raise CorruptCheckpointError(f"{uri}: the manifest records step {manifest.step}")
    check_sizes(manifest, storage.list_files(uri, storage_options), uri)
    into = into or {}
    sharded = "sharded" in manifest.components
    if sharded:  # model and optimizer are DCP files that every rank loads later: check them now
        from .sharded import check_files
        check_files(uri, manifest, check_all and verify, storage_options)
    jobs: Dict[str, Any] = {}
    if not sharded:
        jobs["model"] = functools.partial(read_model, uri, manifest, verify, map_location, storage_options,
                                          into=into.get("model"))
    for comp in COMPONENTS:
        name = manifest.file_for(comp)
        if name is not None:
            jobs[comp] = functools.partial(read_component, uri, manifest, name, verify, map_location,
                                           storage_options, into=into.get(comp))
    # As on the write side: the files are independent, so read (and hash) them concurrently.
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="ckptmgr-read") as pool:
        futures = {comp: pool.submit(job) for comp, job in jobs.items()}
        out: Dict[str, Any] = {"manifest": manifest, "model": None}
        out.update({comp: None for comp in COMPONENTS})
        out.update({comp: future.result() for comp, future in futures.items()})
    name = manifest.rng_file(rank)
    out["rng"] = None if name is None else read_component(uri, manifest, name, verify, None, storage_options)
    if check_all and verify:
        for other in range(manifest.world_size):
            name = manifest.rng_file(other)
            if other != rank and name is not None:
                _inside(uri, name)
                verify_file(storage.join(uri, name), name, manifest.files[name], uri, storage_options)
    return out


def load_weights(step_uri: str, step: int, map_location: MapLocation = None,
                 storage_options: Options = None) -> Dict[str, Any]:
    """Weights and meta of one committed step, verified: ``{'state_dict', 'meta', 'step', 'metrics'}``.

    Raises:
        CheckpointNotFoundError: the step has no manifest (never committed).
        ChecksumError, CorruptCheckpointError: the weights or meta differ from the manifest.
    """
    try:
        manifest = read_manifest(step_uri, storage_options)
    except CheckpointNotFoundError:
        raise CheckpointNotFoundError(f"{step_uri} has no manifest: that save never committed",
                                      "load another step; `ckptmgr ls DIR` lists committed ones") from None
    if manifest.step != step:
        raise CorruptCheckpointError(f"{step_uri}: the manifest records step {manifest.step}")
    if "sharded" in manifest.components:  # DCP shards: consolidated in this process
        from .sharded import consolidate
        weights, module_meta = consolidate(step_uri, storage_options), {}
    else:
        weights, module_meta = read_model(step_uri, manifest, True, map_location, storage_options)
    name = manifest.file_for("meta")
    meta = read_component(step_uri, manifest, name, True, None, storage_options) if name else {}
    if module_meta:
        weights._metadata = module_meta  # type: ignore[attr-defined]
    return {"state_dict": weights, "meta": plain(meta), "step": step, "metrics": dict(manifest.metrics)}


def build_manifest(step: int, metrics: Mapping[str, Any], written: List[Dict[str, Any]], world: int) -> Manifest:
    """The commit record of a step from every rank's :func:`write_rank_files` reply (rank order)."""
    files = {n: FileEntry(int(size), sha) for reply in written for n, (size, sha) in reply["files"].items()}
    parts: Dict[str, Any] = dict(written[0]["components"])
    parts["rng"] = {str(rank): reply["rng"] for rank, reply in enumerate(written)}
    return Manifest(step=step, files=files, components=parts, metrics=dict(metrics), world_size=world,
                    time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
