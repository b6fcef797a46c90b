"""A checkpoint at a path a framework chooses, as an atomic, checksummed directory (a *container*).

Trainers such as Lightning decide where each checkpoint goes and rewrite some
paths in place (``last.ckpt`` after every save). A directory cannot be
replaced atomically, and moving the old one aside first leaves an instant in
which the path is missing (a crash there makes ``ckpt_path="last"`` start
from scratch). So the path is a small manager directory that holds the
checkpoint as a ckptmgr step, ``<path>/step_00000015/``, committed by the
store's commit protocol (:mod:`ckptmgr.step.commit`: manifest last, with the
size and checksum of every file):

* rewriting a path commits the new step beside the old one, then uncommits
  the old one: at every instant the path holds at least one committed step,
  and readers take the newest (the old content until the new one commits);
* a path that does not exist yet is built under ``<parent>/.ckptmgr-tmp/``
  and renamed into place on local disk, so it appears only once committed;
* removing a path uncommits its steps before deleting anything.

Each step is an ordinary manager step (``model.safetensors`` with bare keys,
JSON or safetensors components, ``meta.json``), so ``ckptmgr verify``,
``ckptmgr inspect`` and ``load_checkpoint`` work on it. Values that cannot be
stored without pickle go to ``pickled.pt`` only when the caller opts in, and
are read back only with ``trust_pickle``.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError, UnsafeCheckpointError
from ..format.checksum import DEFAULT_CHECKSUM, FileEntry, HashingReader, HashingWriter
from ..format.manifest import Manifest, check_sizes, compare
from ..format.maplocation import MapLocation
from ..format.torchfile import load_torch, save_torch
from ..io.access import open_store
from ..io.local import LocalStore
from ..io.store import Options, Store
from ..step.commit import CommitProtocol, protocol_for, run_reclaims
from ..step.files import read_component, read_files, read_model, run_concurrently, write_component, write_model
from ..step.index import read_manifests
from ..step.names import leftover_step, parse_step_name, step_name

logger = logging.getLogger(__name__)

__all__ = ["TMP_DIR", "PICKLED", "StepContent", "committed", "save", "read", "remove"]

TMP_DIR = ".ckptmgr-tmp"  # neither ends in .ckpt nor starts with "last": trainers' scans skip it
PICKLED = "pickled"       # component name of the opt-in pickle file

_cleaned: Set[str] = set()  # parents whose stale temporary containers this process has removed
_cleaned_lock = threading.Lock()


@dataclass
class StepContent:
    """What one step of a container holds.

    Attributes:
        model: Weights, written as a plain safetensors file (bare keys), or None.
        components: Component name -> nested tree (JSON, or safetensors with the
            JSON skeleton in its header); ``'meta'`` is what ``load_checkpoint`` reports.
        pickled: Values stored with pickle (the caller opted in), or None.
        metrics: Numbers for the manifest (``ckptmgr ls`` shows them).
    """

    model: Optional[Mapping[str, Any]] = None
    components: Dict[str, Any] = field(default_factory=dict)
    pickled: Optional[Dict[str, Any]] = None
    metrics: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- listing


def committed(store: Store) -> Dict[int, Manifest]:
    """The committed steps of a container (manifest present and self-consistent), by step."""
    steps = [s for s in map(parse_step_name, store.listdir()) if s is not None]
    return {step: out for step, out in read_manifests(store, steps).items() if isinstance(out, Manifest)}


# --------------------------------------------------------------------------- saving


def _write_pickled(store: Store, name: str, values: Dict[str, Any]) -> FileEntry:
    buffer = io.BytesIO()
    save_torch(values, buffer)
    with store.atomic_write(name) as fh:
        writer = HashingWriter(fh, DEFAULT_CHECKSUM)
        writer.write(buffer.getbuffer())
    return writer.entry()


def _write_files(store: Store, prefix: str, content: StepContent) -> Tuple[Dict[str, FileEntry], Dict[str, Any]]:
    """Write every file of a step into ``store`` (names start with ``prefix``), hashed while written."""
    jobs: Dict[str, Callable[[], Tuple[str, FileEntry]]] = {}
    if content.model is not None:
        module_meta = {k: dict(v) for k, v in getattr(content.model, "_metadata", {}).items() if isinstance(v, Mapping)}
        jobs["model"] = functools.partial(write_model, store, content.model, module_meta, prefix=prefix,
                                          checksum=DEFAULT_CHECKSUM)
    for name, tree in content.components.items():
        jobs[name] = functools.partial(write_component, store, name, tree, prefix=prefix,
                                         checksum=DEFAULT_CHECKSUM)
    if content.pickled:
        values, name = content.pickled, f"{prefix}{PICKLED}.pt"
        jobs[PICKLED] = lambda: (name, _write_pickled(store, name, values))
    done = run_concurrently(jobs, "ckptmgr-write")
    store.sync_dir()
    return dict(done.values()), {comp: name for comp, (name, _) in done.items()}


def _uncommit(protocol: CommitProtocol, steps: List[int]) -> None:
    run_reclaims([protocol.uncommit(step) for step in steps])


def _commit_into(store: Store, step: int, content: StepContent) -> None:
    """Commit ``content`` as ``step`` inside the container ``store``; then drop every other step."""
    protocol = protocol_for(store)
    names = store.listdir()
    steps = {s for s in map(parse_step_name, names) if s is not None}
    known = committed(store)
    protocol.clean_leftovers(names, sorted(steps - set(known)))
    current = sorted(known)[-1:]  # what the path holds now: the newest committed step
    _uncommit(protocol, sorted(known)[:-1])  # more than one: leftovers of an interrupted save
    plan = protocol.prepare(step, force=True)
    try:
        files, components = _write_files(store.sub(plan.root), plan.prefix, content)
        manifest = Manifest(step=step, files=files, components=components, metrics=dict(content.metrics),
                            world_size=1, time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            checksum=DEFAULT_CHECKSUM)
        protocol.commit(plan, manifest)
    except BaseException:
        protocol.abort(plan)
        raise
    _uncommit(protocol, [s for s in current if s != step])


def _temp_container() -> str:
    return f"{TMP_DIR}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _clean_temporaries(parent: LocalStore) -> None:
    """Remove temporary containers of dead processes on this host (once per parent and process)."""
    with _cleaned_lock:
        if parent.root in _cleaned:
            return
        _cleaned.add(parent.root)
    host = socket.gethostname()
    for name in parent.listdir(TMP_DIR):
        owner, _, rest = name.rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if owner_host != host or not pid.isdigit() or not rest or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # the writer is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        logger.info("removing %s/%s/%s, left by a save that did not finish", parent.root, TMP_DIR, name)
        parent.remove(f"{TMP_DIR}/{name}", recursive=True)


def _save_new_local(container: LocalStore, step: int, content: StepContent) -> None:
    """Build a container under a temporary name beside the path, then rename (or swap) it into place."""
    parent_path, name = os.path.split(container.root)
    parent = LocalStore(parent_path or ".")
    parent.makedirs(TMP_DIR)
    _clean_temporaries(parent)
    tmp = _temp_container()
    try:
        _commit_into(parent.sub(tmp), step, content)
        if os.path.lexists(container.root):  # a plain file (another CheckpointIO wrote it): swap it out
            if not parent.exchange_dirs(tmp, name):
                raise StorageError(f"{container.root} is a file and cannot be swapped for a checkpoint directory "
                                   "here", "move that file away, or write checkpoints to another directory")
        else:
            parent.rename_dir(tmp, name)
    finally:
        parent.remove(tmp, recursive=True)  # nothing left there after the rename; the old file after a swap
        try:
            os.rmdir(parent.path(TMP_DIR))
        except OSError:
            pass  # not empty: another save is using it


def save(uri: str, step: int, content: StepContent, options: Options = None) -> None:
    """Commit ``content`` as the checkpoint at ``uri`` (a local path or fsspec URL), replacing what is there.

    Raises:
        UnserializableStateError: a component holds something that needs pickle.
        StorageError: writing failed (the previous checkpoint at ``uri``, if any, is untouched), or a
            plain file on an object store is in the way.
    """
    container = open_store(uri, options)
    if isinstance(container, LocalStore):
        if os.path.islink(container.root) or not os.path.isdir(container.root):
            _save_new_local(container, step, content)
            return
    elif container.exists() and not container.isdir():
        raise StorageError(f"{uri} is a file, not a checkpoint directory",
                           "delete it or write checkpoints to another directory")
    if not _all_ours(container.listdir()):
        raise StorageError(f"{uri} is a directory holding files ckptmgr did not write; not writing into it",
                           "move it away or write checkpoints to another directory")
    _commit_into(container, step, content)


def _all_ours(names: List[str]) -> bool:
    """True when every entry is a step directory or a save's leftover (names ckptmgr writes in a container)."""
    return all(parse_step_name(n) is not None or leftover_step(n) is not None for n in names)


# --------------------------------------------------------------------------- reading


def _read_pickled(store: Store, manifest: Manifest, name: str, map_location: MapLocation) -> Any:
    want = manifest.files.get(name)
    if want is None:
        raise CorruptCheckpointError(f"{store.root}: the manifest names {name} but has no entry for it")
    store.check_inside(name)
    with store.open_read(name) as fh:
        reader = HashingReader(fh, manifest.checksum)
        data = reader.read()
        got = reader.finish()
    compare(name, got, want, store.root, manifest.checksum)  # verified before a single byte is unpickled
    return load_torch(io.BytesIO(data), map_location, trust_pickle=True, source=store.uri(name))


def _read_step(store: Store, manifest: Manifest, map_location: MapLocation, trust_pickle: bool,
               uri: str) -> StepContent:
    check_sizes(manifest, store.list_files(), store.root)
    pickled = manifest.file_for(PICKLED)
    if pickled is not None and not trust_pickle:
        raise UnsafeCheckpointError(f"{uri} holds values that were stored with pickle ({pickled}); loading them "
                                    "could run arbitrary code",
                                    "if you trust this checkpoint, pass trust_pickle=True")
    jobs: Dict[str, Callable[[], Any]] = {}
    for name, file in manifest.components.items():
        if not isinstance(file, str) or name == PICKLED:
            continue
        if name == "model":
            jobs[name] = functools.partial(read_model, store, manifest, True, map_location)
        else:
            jobs[name] = functools.partial(read_component, store, manifest, file, True, map_location)
    if pickled is not None:
        jobs[PICKLED] = functools.partial(_read_pickled, store, manifest, pickled, map_location)
    done = read_files(store, jobs)
    model = None
    if "model" in done:
        model, module_meta = done.pop("model")
        if module_meta:
            model._metadata = module_meta
    return StepContent(model=model, components={k: v for k, v in done.items() if k != PICKLED},
                       pickled=done.get(PICKLED), metrics=dict(manifest.metrics))


def read(uri: str, options: Options = None, map_location: MapLocation = None,
         trust_pickle: bool = False) -> Tuple[int, StepContent]:
    """Read and verify the checkpoint at ``uri``: its newest committed step, every file checked.

    An older committed step is used only when the newest is damaged (a save
    interrupted between its commit and the old step's removal leaves two).

    Returns:
        ``(step, content)``.

    Raises:
        CheckpointNotFoundError: nothing committed there (the save that created it did not finish).
        ChecksumError, CorruptCheckpointError: a file differs from the manifest.
        UnsafeCheckpointError: it holds pickled values and ``trust_pickle`` is False.
    """
    container = open_store(uri, options)
    known = committed(container)
    if not known:
        if not container.exists():
            raise CheckpointNotFoundError(f"no checkpoint at {uri}")
        raise CheckpointNotFoundError(f"{uri} holds no committed checkpoint",
                                      "the save that created it did not finish; load an older checkpoint")
    errors: List[BaseException] = []
    for step in sorted(known, reverse=True):
        try:
            return step, _read_step(container.sub(step_name(step)), known[step], map_location, trust_pickle, uri)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            logger.warning("%s: step %d is damaged: %s", uri, step, exc)
            errors.append(exc)
    raise errors[0]  # the newest step's problem (an older one is there only after an interrupted save)


# --------------------------------------------------------------------------- removing


def remove(uri: str, options: Options = None) -> str:
    """Delete the checkpoint at ``uri``: uncommit each step through the commit protocol, then free the rest.

    Returns:
        ``'removed'``; ``'file'`` for a plain file or link (deleted); ``'absent'``;
        ``'foreign'`` for a directory holding files ckptmgr did not write (left alone).
    """
    container = open_store(uri, options)
    if isinstance(container, LocalStore) and os.path.islink(container.root):
        os.unlink(container.root)
        return "file"
    if not container.exists():
        return "absent"
    if not container.isdir():
        container.remove()
        return "file"
    if not _all_ours(container.listdir()):
        logger.warning("not removing %s: it holds files ckptmgr did not write", uri)
        return "foreign"
    _uncommit(protocol_for(container), sorted(committed(container)))
    container.remove(recursive=True)
    return "removed"
