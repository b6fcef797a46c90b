"""torch.distributed.checkpoint (DCP) storage that fits ckptmgr's commit protocol and trust rules.

DCP writes one data file per rank (``__<rank>_<n>.distcp``) and one metadata
file, a pickle, that it unpickles on load. Two things have to change for
ckptmgr: every file of a checkpoint is listed in the manifest, whose names
never start with a dot, so the metadata is written as ``dcp.metadata``
instead of DCP's ``.metadata``; and no byte of that pickle is unpickled before
its sha256 matches the manifest. The reader here checks the very bytes it then
unpickles, so nothing can swap the file between the check and the load.

Only the metadata name, the metadata read and the read of non-tensor entries
(``weights_only=True`` instead of DCP's full pickle) are overridden; writing
and reading tensors stay DCP's own.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
from typing import Any, Dict, Optional

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from . import storage
from .errors import CheckpointError, CorruptCheckpointError, DistributedError, UnsafeCheckpointError
from .manifest import FileEntry, HashingReader, compare

logger = logging.getLogger(__name__)

__all__ = ["METADATA_NAME", "is_data_file", "writer", "reader", "hash_files", "check_metadata_bytes", "translate",
           "SafeLoadPlanner", "SafeEmptyLoadPlanner"]

METADATA_NAME = "dcp.metadata"
_DATA_RE = re.compile(r"^__(\d+)_\d+\.distcp$")
Options = Optional[Dict[str, Any]]


def is_data_file(name: str, rank: Optional[int] = None) -> bool:
    """True for a DCP data file name (written by ``rank`` when given)."""
    match = _DATA_RE.match(name.rsplit("/", 1)[-1])
    return bool(match) and (rank is None or int(match.group(1)) == rank)


def check_metadata_bytes(data: bytes, want: FileEntry, source: str) -> None:
    """Compare DCP metadata bytes with the manifest entry (size and sha256, always).

    Raises:
        ChecksumError: the bytes differ; they must not be unpickled.
    """
    got = FileEntry(len(data), hashlib.sha256(data).hexdigest())
    compare(METADATA_NAME, got, want, source)


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


class _LocalWriter(_Recording, FileSystemWriter):
    pass


class _RemoteWriter(_Recording, FsspecWriter):
    pass


class _VerifiedMetadata(_NamedMetadata):
    """Mixin: read the metadata pickle only after its bytes match the manifest."""

    expected: Optional[FileEntry] = None
    source: str = ""

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
        check_metadata_bytes(data, self.expected, self.source)
        metadata = pickle.loads(data)  # checked above: these are the bytes the manifest vouches for
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpointError(f"{self.source}: {METADATA_NAME} holds a {type(metadata).__name__}, "
                                         "not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class _LocalReader(_VerifiedMetadata, FileSystemReader):
    pass


class _RemoteReader(_VerifiedMetadata, FsspecReader):
    pass


def writer(dcp_dir: str, storage_options: Options = None) -> Any:
    """A DCP StorageWriter into ``dcp_dir`` (local path or fsspec URL); it never overwrites metadata.

    Local files are fsynced by DCP; on object stores each file is one upload.
    """
    if storage.is_local(dcp_dir):
        return _LocalWriter(storage.local_path(dcp_dir), sync_files=True, overwrite=False)
    out = _RemoteWriter(dcp_dir, overwrite=False)
    out.fs.fs = storage.get_fs(dcp_dir, storage_options)[0]  # ckptmgr's options (endpoint, credentials)
    return out


def reader(dcp_dir: str, expected: FileEntry, source: str, storage_options: Options = None) -> Any:
    """A DCP StorageReader over ``dcp_dir`` that verifies the metadata against ``expected`` before unpickling."""
    if storage.is_local(dcp_dir):
        out: Any = _LocalReader(storage.local_path(dcp_dir))
    else:
        out = _RemoteReader(dcp_dir)
        out.fs.fs = storage.get_fs(dcp_dir, storage_options)[0]
    out.expected = expected
    out.source = source
    return out


def hash_files(root: str, names: Any, storage_options: Options = None) -> Dict[str, FileEntry]:
    """Size and sha256 of each name (relative to ``root``), read back from storage."""
    out: Dict[str, FileEntry] = {}
    for name in sorted(names):
        with storage.open_read(storage.join(root, name), storage_options) as fh:
            out[name] = HashingReader(fh).finish()
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
