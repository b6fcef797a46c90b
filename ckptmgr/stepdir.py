"""The files of one checkpoint step, and the protocol that commits and deletes them.

CheckpointManager decides what to save; this module decides how the bytes land
so that a crash at any instant leaves each step either committed and complete
or invisible:

* local disk: files go into a temporary directory ``.tmp-step_N-<uuid>`` beside
  the final one, each fsynced; the manifest is written last; the directory is
  renamed into place and the parent fsynced. Replacing a committed step swaps
  the two directories atomically (``renameat2(RENAME_EXCHANGE)``); where the
  kernel lacks it, two renames leave the old copy under ``.old-step_N-<uuid>``
  for an instant, and the next save renames it back if the process died there.
* object stores: data objects are uploaded (each atomically) into the step
  prefix, then the manifest object, whose single PUT is the commit. Replacing
  a committed step writes the new data under ``step_N/rev-<id>/`` so the old
  manifest stays valid until the new one overwrites it in one PUT.

Component files are JSON when they hold no tensors and safetensors (with the
JSON structure in the header) when they do, so nothing here ever unpickles.
"""
from __future__ import annotations

import json
import logging
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from . import storage
from .errors import CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from .manifest import (MANIFEST_NAME, FileEntry, HashingReader, HashingWriter, Manifest, compare,
                       is_temp_name, old_name, parse_old_name, step_name, temp_name)
from .serialization import SKELETON_KEY, MapLocation, from_skeleton, read_safetensors, to_skeleton, write_safetensors

logger = logging.getLogger(__name__)

__all__ = ["WritePlan", "write_component", "write_model", "read_component", "read_model", "read_manifest",
           "probe", "prepare", "commit", "abort", "delete_step", "clean_leftovers"]

MODULE_META_KEY = "ckptmgr.module_metadata"
Options = Optional[Dict[str, Any]]

# --------------------------------------------------------------------------- component files


def _write(uri: str, fill: Any, storage_options: Options) -> FileEntry:
    with storage.atomic_write(uri, storage_options) as fh:
        writer = HashingWriter(fh)
        fill(writer)
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


def _parse_json(reader: HashingReader, size: int) -> Any:
    try:
        return json.loads(reader.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"not valid JSON: {exc}") from exc


def read_component(step_uri: str, manifest: Manifest, name: str, verify: bool = True,
                   map_location: MapLocation = None, storage_options: Options = None) -> Any:
    """Read a component file written by :func:`write_component`, checking it against the manifest.

    Raises:
        ChecksumError: size or sha256 differ from the manifest.
        CorruptCheckpointError: the file is missing, malformed, or of an unknown kind.
    """
    if name.endswith(".json"):
        return from_skeleton(_read(step_uri, manifest, name, verify, _parse_json, storage_options), {})
    if not name.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{step_uri}: {name} is neither JSON nor safetensors; refusing to read it")

    def parse(reader: HashingReader, size: int) -> Any:
        tensors, metadata = read_safetensors(reader, size=size, map_location=map_location)
        if SKELETON_KEY not in metadata:
            return tensors
        try:
            skeleton = json.loads(metadata[SKELETON_KEY])
        except json.JSONDecodeError as exc:
            raise CorruptCheckpointError(f"{name}: structure metadata is not JSON") from exc
        return from_skeleton(skeleton, tensors)
    return _read(step_uri, manifest, name, verify, parse, storage_options)


def read_model(step_uri: str, manifest: Manifest, verify: bool = True, map_location: MapLocation = None,
               storage_options: Options = None) -> Tuple["OrderedDict[str, Any]", Dict[str, Any]]:
    """Read the model weights and module metadata of a step.

    Raises:
        CorruptCheckpointError: no model in the manifest, or the file is damaged.
    """
    name = manifest.file_for("model")
    if name is None or not name.endswith(".safetensors"):
        raise CorruptCheckpointError(f"{step_uri}: the manifest names no model weights file")

    def parse(reader: HashingReader, size: int) -> Any:
        tensors, metadata = read_safetensors(reader, size=size, map_location=map_location)
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


# --------------------------------------------------------------------------- commit protocol


@dataclass
class WritePlan:
    """Where one save writes (JSON-able: rank 0 sends it to the other ranks).

    Attributes:
        final: URI of the step directory once committed.
        write_dir: Directory the data files are written into.
        prefix: Prefix of file names relative to ``final`` (``'rev-<id>/'`` when
            replacing a committed step on an object store).
        mode: ``'local'`` (temp dir + rename) or ``'remote'`` (manifest last).
        replace: A directory of that name exists already and is replaced.
    """

    final: str
    write_dir: str
    prefix: str
    mode: str
    replace: bool

    @property
    def root(self) -> str:
        """The directory that file names (``prefix`` included) are relative to while writing."""
        return self.write_dir if self.mode == "local" else self.final

    def to_json(self) -> Dict[str, Any]:
        """The plan as a dict."""
        return asdict(self)


def prepare(directory: str, step: int, force: bool, storage_options: Options = None) -> WritePlan:
    """Check the step and make room for it (rank 0, before anything is written).

    Raises:
        CheckpointExistsError: ``step`` is committed and ``force`` is False.
    """
    final = storage.join(directory, step_name(step))
    status = probe(final, storage_options)
    if status == "committed" and not force:
        raise CheckpointExistsError(f"step {step} is already committed in {directory}")
    if status == "damaged":
        logger.warning("replacing %s: its manifest is damaged", final)
    elif status == "absent" and storage.exists(final, storage_options):
        logger.warning("replacing %s: it holds no manifest (an uncommitted or foreign copy)", final)
    if storage.is_local(directory):
        storage.makedirs(directory)
        tmp = storage.join(directory, temp_name(step))
        storage.make_dir(tmp)
        return WritePlan(final, tmp, "", "local", storage.exists(final))
    if status == "committed":
        prefix = f"rev-{uuid.uuid4().hex[:12]}/"
        return WritePlan(final, storage.join(final, prefix), prefix, "remote", True)
    storage.remove(final, recursive=True, storage_options=storage_options)  # uncommitted leftovers
    return WritePlan(final, final, "", "remote", False)


def commit(plan: WritePlan, manifest: Manifest, storage_options: Options = None) -> None:
    """Write the manifest last and make the step visible; then tidy what it replaced."""
    if plan.mode == "remote":
        with storage.atomic_write(storage.join(plan.final, MANIFEST_NAME), storage_options) as fh:
            fh.write(manifest.to_bytes())
        if plan.replace:  # the old revision's objects are unreferenced now
            keep = set(manifest.files) | {MANIFEST_NAME}
            for name in storage.list_files(plan.final, storage_options):
                if name not in keep:
                    _quietly(storage.remove, storage.join(plan.final, name), storage_options=storage_options)
        return
    with storage.atomic_write(storage.join(plan.write_dir, MANIFEST_NAME)) as fh:
        fh.write(manifest.to_bytes())
    if not plan.replace:
        storage.rename_dir(plan.write_dir, plan.final)
        return
    if storage.exchange_dirs(plan.write_dir, plan.final):
        _quietly(storage.remove, plan.write_dir, recursive=True)  # now holds the replaced checkpoint
        return
    # No atomic swap here: the one window where neither copy has the final name.
    # clean_leftovers() renames the old copy back if the process dies in it.
    parent = plan.final.rsplit("/", 1)[0]
    old = storage.join(parent, old_name(manifest.step))
    storage.rename_dir(plan.final, old)
    try:
        storage.rename_dir(plan.write_dir, plan.final)
    except BaseException:
        storage.rename_dir(old, plan.final)  # put the old checkpoint back before reporting
        raise
    _quietly(storage.remove, old, recursive=True)


def abort(plan: WritePlan, storage_options: Options = None) -> None:
    """Remove what a failed save wrote (best effort; leftovers are cleaned at the next save)."""
    target = plan.write_dir if (plan.mode == "local" or plan.prefix) else plan.final
    _quietly(storage.remove, target, recursive=True, storage_options=storage_options)


def delete_step(directory: str, step: int, storage_options: Options = None) -> None:
    """Uncommit a step, then delete its files, so a crash midway never leaves a committed partial step.

    Locally the directory is first renamed to a temporary name (one atomic
    uncommit that takes the manifest with it; a crash leaves only a temp
    directory the next save removes); on object stores the manifest object is
    deleted first, then the rest.
    """
    final = storage.join(directory, step_name(step))
    if storage.is_local(directory):
        trash = storage.join(directory, temp_name(step))
        storage.rename_dir(final, trash)
        storage.remove(storage.join(trash, MANIFEST_NAME))
        storage.remove(trash, recursive=True)
        return
    storage.remove(storage.join(final, MANIFEST_NAME), storage_options=storage_options)
    storage.remove(final, recursive=True, storage_options=storage_options)


def clean_leftovers(directory: str, names: Iterable[str], uncommitted: Iterable[int] = (),
                    storage_options: Options = None) -> List[str]:
    """Remove what crashed saves left behind, and nothing else.

    Args:
        directory: The manager directory.
        names: Its entries (one listing).
        uncommitted: Steps whose directory exists without a manifest; removed on
            object stores only (there they are interrupted uploads; locally a save
            never writes into a final step directory).
        storage_options: fsspec options.

    Returns:
        The names removed (or renamed back).
    """
    names = set(names)
    done = []
    if storage.is_local(directory):
        for name in sorted(names):
            if is_temp_name(name):
                _quietly(storage.remove, storage.join(directory, name), recursive=True)
                done.append(name)
            elif parse_old_name(name):
                target = parse_old_name(name)
                if target in names:
                    _quietly(storage.remove, storage.join(directory, name), recursive=True)
                else:  # the process died between the two renames of a forced save: roll back
                    logger.warning("restoring %s from %s (a forced save was interrupted)", target, name)
                    storage.rename_dir(storage.join(directory, name), storage.join(directory, target))
                    names.add(target)
                done.append(name)
        return done
    for step in uncommitted:
        _quietly(storage.remove, storage.join(directory, step_name(step)), recursive=True,
                 storage_options=storage_options)
        done.append(step_name(step))
    return done


def _quietly(func: Any, *args: Any, **kwargs: Any) -> None:
    try:
        func(*args, **kwargs)
    except Exception as exc:  # tidying is best effort; the next save tries again
        logger.warning("could not remove %s: %s", args[0] if args else "?", exc)
