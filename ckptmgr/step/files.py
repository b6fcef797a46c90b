"""The files of one step: one file per component, written hashed and read back verified.

A step holds one file per component (model weights, optimizer, scheduler,
scaler, extra, meta) plus one RNG file per rank. Components without tensors
are JSON; those with tensors are safetensors whose header carries the JSON
skeleton, and the weights file is a plain safetensors file keyed like the bare
model, readable by any safetensors tool. Files are hashed while they are
written and verified while they are read, so a load checks every byte in the
same pass that parses it. The file kind comes from the manifest's name for it,
never from sniffing, and nothing here can unpickle.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..faults import fault_point
from ..format.checkpoint_file import MODULE_META_KEY
from ..format.checksum import FileEntry, HashingReader, HashingWriter
from ..format.manifest import MANIFEST_NAME, Manifest, compare, verify_file
from ..format.maplocation import MapLocation
from ..format.pieces import usable_cpus
from ..format.safetensors import read_safetensors, write_safetensors
from ..format.skeleton import SKELETON_KEY, from_skeleton, to_skeleton
from ..io.store import Store

logger = logging.getLogger(__name__)

__all__ = ["WORKERS", "write_component", "write_model", "read_component", "read_model", "read_manifest", "probe",
           "verify_file", "run_concurrently", "read_files",  # verify_file: re-exported from ckptmgr.format.manifest
           "spare_cores"]

WORKERS = max(2, min(4, os.cpu_count() or 2))  # files of one step written or read at once
Tensors = Optional[Mapping[str, torch.Tensor]]
_limit = threading.local()  # .workers: how many threads spare_cores() lets the calling thread use


@contextlib.contextmanager
def spare_cores() -> Iterator[int]:
    """Within this block, the calling thread runs files on no more threads than training leaves free.

    An async save runs beside the training loop, whose torch ops use
    ``torch.get_num_threads()`` cores; writing the files of a step on more
    threads than the cores left over only makes them fight the loop for CPU.
    The save then takes longer in the background and costs the loop less.
    """
    spare = max(1, min(WORKERS, usable_cpus() - torch.get_num_threads()))
    previous = getattr(_limit, "workers", None)
    _limit.workers = spare
    try:
        yield spare
    finally:
        _limit.workers = previous


def run_concurrently(jobs: Mapping[str, Callable[[], Any]], name: str, cpu_bound: bool = True) -> Dict[str, Any]:
    """Run independent jobs (one per file) on a few threads; every job finishes before this returns.

    The model and the optimizer moments are the big files, so writing (or
    reading and hashing) them at once uses more than one core or connection.
    Inside :func:`spare_cores`, ``cpu_bound`` jobs (local files) get fewer
    threads; uploads, which mostly wait on the network, keep them all. The first
    exception is raised after all jobs ended (on one thread: at once).
    """
    workers = (getattr(_limit, "workers", None) if cpu_bound else None) or WORKERS
    if workers == 1 or len(jobs) == 1:
        return {key: job() for key, job in jobs.items()}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        futures = {key: pool.submit(job) for key, job in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def read_files(store: Store, jobs: Mapping[str, Callable[[], Any]]) -> Dict[str, Any]:
    """Run the read jobs of a step's files (one per file of ``store``): local files one after another, remote at once.

    A local file of :data:`~ckptmgr.format.checksum.SPLIT_FROM` bytes or more
    is read on every core by itself (:meth:`HashingReader.fill`), so reading
    two large files at once would only put twice as many threads on the same
    cores (measured: a 480 MiB restore took 0.088 s one file at a time, 0.103 s
    two at a time). Remote reads mostly wait on the network and overlap.
    """
    if store.is_local:
        return {key: job() for key, job in jobs.items()}
    return run_concurrently(jobs, "ckptmgr-read")


# --------------------------------------------------------------------------- writing


def _write(store: Store, name: str, fill: Callable[[HashingWriter], Any], checksum: str) -> FileEntry:
    # The step is not visible until its commit, so its files need no atomicity of their own;
    # the step format fsyncs the directory once after the last file.
    with store.write_unpublished(name) as fh:
        writer = HashingWriter(fh, checksum, parts=True)  # part digests let a restore verify on every core
        fill(writer)
    fault_point("save.after_data_file")
    return writer.entry()


def write_component(store: Store, base: str, obj: Any, prefix: str = "", *,
                    checksum: str) -> Tuple[str, FileEntry]:
    """Write ``obj`` as ``<prefix><base>.json`` (no tensors) or ``<prefix><base>.safetensors``, hashed (``checksum``).

    Returns:
        ``(name relative to the store, FileEntry)``.

    Raises:
        UnserializableStateError: ``obj`` holds something that needs pickle.
    """
    skeleton, tensors = to_skeleton(obj, path=base)
    text = json.dumps(skeleton, allow_nan=False)
    if tensors:
        name = f"{prefix}{base}.safetensors"
        return name, _write(store, name, lambda w: write_safetensors(w, tensors, {SKELETON_KEY: text}), checksum)
    name = f"{prefix}{base}.json"
    return name, _write(store, name, lambda w: w.write(text.encode("utf-8")), checksum)


def write_model(store: Store, state: Mapping[str, Any], module_meta: Mapping[str, Any],
                prefix: str = "", base: str = "model", *, checksum: str) -> Tuple[str, FileEntry]:
    """Write model weights as ``<prefix><base>.safetensors``, keyed like the bare model's state dict.

    Any tool that reads safetensors can use the file. Non-tensor entries
    (``get_extra_state``) are kept through a JSON skeleton in the header.
    """
    metadata = {"format": "pt", MODULE_META_KEY: json.dumps(module_meta)}
    if all(isinstance(v, torch.Tensor) for v in state.values()):
        tensors: Mapping[str, torch.Tensor] = state
    else:
        skeleton, tensors = to_skeleton(dict(state), path="model")
        metadata[SKELETON_KEY] = json.dumps(skeleton, allow_nan=False)
    name = f"{prefix}{base}.safetensors"
    return name, _write(store, name, lambda w: write_safetensors(w, tensors, metadata), checksum)


# --------------------------------------------------------------------------- reading


def _read(store: Store, manifest: Manifest, name: str, verify: bool, parse: Callable[[HashingReader, int], Any]) -> Any:
    """Open one file of the manifest, parse it while hashing, then compare size and checksum."""
    want = manifest.files.get(name)
    if want is None:
        raise CorruptCheckpointError(f"{store.root}: the manifest names {name} as a component but has no entry "
                                     "for it")
    store.check_inside(name)

    def check(got: FileEntry) -> None:
        compare(name, got if verify else FileEntry(got.size, want.digest), want, store.root, manifest.checksum)

    try:
        with store.open_read(name) as fh:
            reader = HashingReader(fh, manifest.checksum if verify else None, want)
            try:
                value = parse(reader, want.size)
            except CorruptCheckpointError:
                check(reader.finish())  # a checksum error explains the damage better
                raise
            check(reader.finish())
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{store.root}: {name} is listed in the manifest but missing") from exc
    return value


def _parse_json(reader: HashingReader, size: int) -> Any:
    try:
        return json.loads(reader.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"not valid JSON: {exc}") from exc


def read_component(store: Store, manifest: Manifest, name: str, verify: bool = True,
                   map_location: MapLocation = None, into: Tensors = None) -> Any:
    """Read a component file written by :func:`write_component`, checking it against the manifest.

    ``into`` maps tensor names (as :func:`ckptmgr.format.skeleton.to_skeleton`
    names them) to existing CPU tensors to fill in place when shape and dtype match.

    Raises:
        ChecksumError: size or checksum differ from the manifest.
        CorruptCheckpointError: the file is missing, malformed, or of an unknown kind.
    """
    if name.endswith(".json"):
        return from_skeleton(_read(store, manifest, name, verify, _parse_json), {})
    if not name.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{store.root}: {name} is neither JSON nor safetensors; refusing to read it")

    def parse(reader: HashingReader, size: int) -> Any:
        tensors, metadata = read_safetensors(reader, size=size, map_location=map_location, into=into)
        if SKELETON_KEY not in metadata:
            return tensors
        try:
            skeleton = json.loads(metadata[SKELETON_KEY])
        except json.JSONDecodeError as exc:
            raise CorruptCheckpointError(f"{name}: structure metadata is not JSON") from exc
        return from_skeleton(skeleton, tensors)
    return _read(store, manifest, name, verify, parse)


def read_model(store: Store, manifest: Manifest, verify: bool = True, map_location: MapLocation = None,
               into: Tensors = None, name: Optional[str] = None) -> Tuple["OrderedDict[str, Any]", Dict[str, Any]]:
    """Read the model weights and module metadata of a step.

    ``into`` maps weight names to existing CPU tensors (the live parameters) to
    fill in place when shape and dtype match, so no second copy is allocated.
    ``name`` is the weights file (default: the manifest's ``model`` file).

    Raises:
        CorruptCheckpointError: no model in the manifest, or the file is damaged.
    """
    name = name or manifest.file_for("model")
    if name is None or not name.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{store.root}: the manifest names no model weights file")

    def parse(reader: HashingReader, size: int) -> Any:
        tensors, metadata = read_safetensors(reader, size=size, map_location=map_location, into=into)
        try:
            module_meta = json.loads(metadata.get(MODULE_META_KEY, "{}"))
            state = from_skeleton(json.loads(metadata[SKELETON_KEY]), tensors) if SKELETON_KEY in metadata \
                else tensors
        except json.JSONDecodeError as exc:
            raise CorruptCheckpointError(f"{name}: header metadata is not JSON") from exc
        return OrderedDict(state), module_meta if isinstance(module_meta, dict) else {}
    return _read(store, manifest, name, verify, parse)


def read_manifest(store: Store) -> Manifest:
    """Read and self-check the manifest of the step directory ``store``.

    Raises:
        CheckpointNotFoundError: there is no manifest (the step never committed).
        CorruptCheckpointError: the manifest is damaged.
    """
    return Manifest.from_bytes(store.read_bytes(MANIFEST_NAME), source=store.uri(MANIFEST_NAME))


def probe(store: Store) -> str:
    """``'committed'``, ``'damaged'`` (a manifest that does not check out) or ``'absent'``."""
    try:
        read_manifest(store)
    except CheckpointNotFoundError:
        return "absent"
    except CorruptCheckpointError:
        return "damaged"
    return "committed"
