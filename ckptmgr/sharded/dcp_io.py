"""torch.distributed.checkpoint (DCP) storage that fits ckptmgr's commit protocol and trust rules.

DCP writes one data file per rank (``__<rank>_<n>.distcp``) and one metadata
file, a pickle, that it unpickles on load. Three things change for ckptmgr:
every file of a checkpoint is listed in the manifest, whose names never start
with a dot, so the metadata is written as ``dcp.metadata`` instead of DCP's
``.metadata``; no byte of that pickle is unpickled before its checksum matches
the manifest (the reader checks the very bytes it then unpickles, so nothing
can swap the file between the check and the load); and it is unpickled with
the allowlist of :mod:`.safe_pickle`, never the standard unpickler, so a
forged file with a recomputed manifest still cannot run code.

Only the metadata name, the metadata read and the read of non-tensor entries
(``weights_only=True`` instead of DCP's full pickle) are overridden; writing
and reading tensors stay DCP's own. The writer's filesystem is wrapped so that
every file DCP writes is hashed as its bytes go out (:class:`_HashingFS`), as
ckptmgr's own files are: no second pass reads them back.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from typing import Any, Dict, Iterator, Optional

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ..errors import CheckpointError, CorruptCheckpointError, DistributedError, UnsafeCheckpointError
from ..format.checksum import FileEntry, HashingReader, HashingWriter
from ..io.store import Store
from .layout import METADATA_NAME, check_metadata_bytes, is_data_file
from .safe_pickle import load_metadata

logger = logging.getLogger(__name__)

__all__ = ["METADATA_NAME", "is_data_file", "writer", "written_entries", "reader", "hash_files", "check_metadata_bytes",
           "translate", "SafeLoadPlanner", "SafeEmptyLoadPlanner"]


class _NamedMetadata:
    """Mixin: DCP's metadata under :data:`METADATA_NAME` (rank-local variants keep DCP's pattern)."""

    def _get_metadata_path(self, rank: Optional[int] = None) -> Any:
        name = METADATA_NAME if rank is None else f"__{rank}_{METADATA_NAME}"
        return self.fs.concat_path(self.path, name)  # type: ignore[attr-defined]


class _Recording(_NamedMetadata):
    """Mixin for writers: remember the data files this rank wrote (no listing, which may be stale on S3)."""

    written: tuple = ()

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)  # type: ignore[misc]
        self.written = tuple(sorted({result.storage_data.relative_path for result in future.wait()}))
        return future


class _HashedStream:
    """What DCP writes a file through: the real stream, with every byte hashed on its way."""

    def __init__(self, stream: Any, checksum: str) -> None:
        self._stream = stream
        self._hashing = HashingWriter(stream, checksum)

    def write(self, data: Any) -> int:
        return self._hashing.write(data)

    def entry(self) -> FileEntry:
        return self._hashing.entry()

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close: the real stream's
        return getattr(self._stream, name)


class _HashingFS:
    """A DCP filesystem whose files opened for writing are hashed while DCP writes them.

    ``entries`` maps a file's base name to its size and checksum; a rename
    (DCP writes its metadata under a temporary name) carries the entry along.
    """

    def __init__(self, fs: Any, checksum: str) -> None:
        self._fs = fs
        self._checksum = checksum
        self.entries: Dict[str, FileEntry] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with self._fs.create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashed = _HashedStream(stream, self._checksum)
            yield hashed
        self.entries[os.path.basename(str(path))] = hashed.entry()

    def rename(self, path: Any, new_path: Any) -> None:
        self._fs.rename(path, new_path)
        entry = self.entries.pop(os.path.basename(str(path)), None)
        if entry is not None:
            self.entries[os.path.basename(str(new_path))] = entry


class _LocalWriter(_Recording, FileSystemWriter):
    pass


class _RemoteWriter(_Recording, FsspecWriter):
    pass


class _VerifiedMetadata(_NamedMetadata):
    """Mixin: read the metadata pickle only after its bytes match the manifest, and only with the allowlist."""

    expected: Optional[FileEntry] = None
    source: str = ""
    checksum: str = "sha256"

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.expected is None:
            raise CorruptCheckpointError(f"{self.source}: no manifest entry for {METADATA_NAME}; refusing to "
                                         "unpickle DCP metadata that nothing vouches for")
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as fh:  # type: ignore[attr-defined]
                data = fh.read()
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"{self.source}: {METADATA_NAME} is listed in the manifest but missing") \
                from exc
        check_metadata_bytes(data, self.expected, self.source, self.checksum)
        metadata = load_metadata(data, self.source)  # the allowlist unpickler; never pickle.loads
        storage_meta = metadata.storage_meta or StorageMeta()
        storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        metadata.storage_meta = storage_meta
        return metadata


class _LocalReader(_VerifiedMetadata, FileSystemReader):
    pass


class _RemoteReader(_VerifiedMetadata, FsspecReader):
    pass


def writer(store: Store, checksum: str) -> Any:
    """A DCP StorageWriter into the directory ``store``; it never overwrites metadata.

    Local files are fsynced by DCP; on object stores each file is one upload,
    complete or absent, and there is nothing to fsync (asking would only make
    torch warn "fsync not supported" for every file). Every file is hashed with
    ``checksum`` as it is written: see :func:`written_entries`.
    """
    if store.is_local:
        out: Any = _LocalWriter(store.root, sync_files=True, overwrite=False)
    else:
        out = _RemoteWriter(store.root, sync_files=False, overwrite=False)
        out.fs.fs = store.fs  # type: ignore[attr-defined]  # ckptmgr's options (endpoint, credentials)
    out.fs = _HashingFS(out.fs, checksum)
    return out


def written_entries(storage_writer: Any, store: Store, names: Any, checksum: str) -> Dict[str, FileEntry]:
    """Size and checksum of each name a :func:`writer` wrote, as hashed while written.

    A name the writer did not see written (another DCP version's way of
    writing it) is read back and hashed instead, so the result is always complete.
    """
    seen = storage_writer.fs.entries
    out = {name: seen[name] for name in names if name in seen}
    missing = [name for name in names if name not in seen]
    if missing:
        logger.debug("DCP files hashed by reading them back: %s", missing)
        out.update(hash_files(store, missing, checksum))
    return out


def reader(store: Store, expected: FileEntry, source: str, checksum: str) -> Any:
    """A DCP StorageReader over ``store``: metadata checked against ``expected``, then read with the allowlist."""
    if store.is_local:
        out: Any = _LocalReader(store.root)
    else:
        out = _RemoteReader(store.root)
        out.fs.fs = store.fs  # type: ignore[attr-defined]
    out.expected = expected
    out.source = source
    out.checksum = checksum
    return out


def hash_files(store: Store, names: Any, checksum: str) -> Dict[str, FileEntry]:
    """Size and ``checksum`` of each name (relative to ``store``), read back from storage."""
    out: Dict[str, FileEntry] = {}
    for name in sorted(names):
        with store.open_read(name) as fh:
            out[name] = HashingReader(fh, checksum).finish()
    return out


def translate(exc: BaseException, what: str) -> CheckpointError:
    """A ckptmgr error for DCP's CheckpointException (a BaseException that gathers every rank's failure).

    A ckptmgr error raised inside DCP (a ChecksumError from the metadata
    check) comes back as itself; anything else becomes a DistributedError
    naming the first failing rank. Callers must never let the BaseException
    escape: ckptmgr's agreement catches ``Exception`` only.
    """
    failures = getattr(exc, "failures", None) or {}
    for rank in sorted(failures):
        inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(inner, CheckpointError):
            return inner
    for rank in sorted(failures):
        inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        return DistributedError(f"{what}: torch.distributed.checkpoint failed on rank {rank}: "
                                f"{type(inner).__name__}: {inner}")
    return DistributedError(f"{what}: torch.distributed.checkpoint failed: {exc}")


def _load_plain(value: Any, fqn: str) -> Any:
    """A non-tensor entry (an lr, the params list of a group) without pickle code: ``weights_only=True``."""
    import torch
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"DCP entry {fqn} needs pickle code to load; ckptmgr refuses it",
                                    "a sharded checkpoint holds tensors and plain values only; this one was "
                                    "altered or written by other code") from exc


class _SafeBytes:
    """Mixin for DCP load planners: non-tensor entries are read with ``weights_only=True``, never full pickle.

    DCP's own planners unpickle these entries without restriction (a full
    ``torch.load``); model and optimizer state hold only numbers, strings,
    tuples and lists there, which the restricted unpickler reads.
    """

    def load_bytes(self, read_item: Any, value: Any) -> None:
        from torch.distributed.checkpoint._traverse import set_element
        fqn = read_item.dest_index.fqn
        obj = _load_plain(value, fqn)
        if self.flatten_state_dict:  # type: ignore[attr-defined]
            set_element(self.original_state_dict, self.mappings[fqn], obj)  # type: ignore[attr-defined]
        else:
            self.state_dict[fqn] = obj  # type: ignore[attr-defined]


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner with :class:`_SafeBytes` (loads into an existing state dict)."""


class SafeEmptyLoadPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that rebuilds a full state dict from the metadata, with :class:`_SafeBytes`."""
