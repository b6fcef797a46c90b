"""Names inside a manager directory, and the manifest that commits a checkpoint.

A CheckpointManager checkpoint is a directory ``step_00000100/`` (a prefix on
object stores) holding data files and, written last, ``manifest.json``: the
step, the size and sha256 of every data file, the metrics, and which file holds
which component. A checkpoint exists for readers only when its manifest parses
and its own checksum matches, so a torn, half-deleted or bit-flipped checkpoint
is never mistaken for a good one. This module owns that format, the naming
rules (what the manager may create and delete), and byte-level verification.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Mapping, Optional

from . import storage
from .digest import PIECE, Sha256Pipeline
from .errors import ChecksumError, CheckpointFormatError, CorruptCheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "FileEntry", "Manifest",
    "step_name", "parse_step_name", "temp_name", "is_temp_name", "old_name", "parse_old_name",
    "HashingWriter", "HashingReader", "check_sizes", "verify_file",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "ckptmgr.checkpoint"
FORMAT_VERSION = 1
CHUNK = 4 * 1024 * 1024

_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TEMP_RE = re.compile(r"^\.tmp-step_\d{8,}-[0-9a-f]{32}$")
_OLD_RE = re.compile(r"^\.old-(step_\d{8,})-[0-9a-f]{32}$")
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# --------------------------------------------------------------------------- naming


def step_name(step: int) -> str:
    """Directory name of ``step``: ``step_00000100`` (at least 8 digits)."""
    return f"step_{int(step):08d}"


def parse_step_name(name: str) -> Optional[int]:
    """The step of a checkpoint directory name, or None when the name is not exactly ours."""
    match = _STEP_RE.match(name)
    if not match:
        return None
    step = int(match.group(1))
    return step if step_name(step) == name else None  # 'step_000000100' is not ours


def temp_name(step: int) -> str:
    """A fresh temporary directory name for writing ``step`` (same parent as the final one)."""
    return f".tmp-{step_name(step)}-{uuid.uuid4().hex}"


def is_temp_name(name: str) -> bool:
    """True for names :func:`temp_name` makes (and only those)."""
    return bool(_TEMP_RE.match(name))


def old_name(step: int) -> str:
    """Where a replaced local checkpoint waits while a forced save swaps without renameat2."""
    return f".old-{step_name(step)}-{uuid.uuid4().hex}"


def parse_old_name(name: str) -> Optional[str]:
    """The step directory an :func:`old_name` directory belongs to, or None."""
    match = _OLD_RE.match(name)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file of a checkpoint."""

    size: int
    sha256: str


@dataclass
class Manifest:
    """The commit record of one checkpoint.

    Attributes:
        step: Training step.
        files: Relative file name -> :class:`FileEntry`, for every data file.
        components: What each file holds: ``{'model': 'model.safetensors', ...,
            'rng': {'0': 'rng-rank00000.safetensors', ...}}``.
        metrics: JSON metrics given to ``save``.
        world_size: Number of ranks that wrote the checkpoint.
        time: ISO-8601 UTC time of the commit.
        format_version: Layout version (readers refuse newer ones).
    """

    step: int
    files: Dict[str, FileEntry]
    components: Dict[str, Any]
    metrics: Dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    time: str = ""
    format_version: int = FORMAT_VERSION

    def _body(self) -> Dict[str, Any]:
        return {
            "format": FORMAT, "format_version": self.format_version, "step": self.step,
            "time": self.time, "world_size": self.world_size, "metrics": self.metrics,
            "components": self.components,
            "files": {name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(self.files.items())},
        }

    def to_bytes(self) -> bytes:
        """Serialise, with a sha256 of the canonical body so any changed byte is detected."""
        body = self._body()
        body["manifest_sha256"] = _digest(body)
        return _render(body)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest") -> "Manifest":
        """Parse and self-check a manifest.

        Raises:
            CorruptCheckpointError: not JSON, self-checksum mismatch, or malformed fields.
            CheckpointFormatError: written by a newer ckptmgr (unknown format version).
        """
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{source} is not valid JSON ({exc}); the checkpoint is damaged") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise CorruptCheckpointError(f"{source} is not a ckptmgr manifest")
        if _render(body) != data:  # even whitespace: a manifest is exactly what to_bytes() wrote
            raise ChecksumError(f"{source} differs from the bytes ckptmgr wrote; the checkpoint is damaged")
        recorded = body.pop("manifest_sha256", None)
        if recorded != _digest(body):
            raise ChecksumError(f"{source} does not match its own checksum; the checkpoint is damaged")
        version = body.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointFormatError(f"{source} has format version {version!r}; this ckptmgr reads up to "
                                        f"{FORMAT_VERSION}", "upgrade ckptmgr to read this checkpoint")
        try:
            files = {str(n): FileEntry(int(e["size"]), str(e["sha256"])) for n, e in body["files"].items()}
            manifest = cls(step=int(body["step"]), files=files, components=dict(body["components"]),
                           metrics=dict(body.get("metrics") or {}), world_size=int(body.get("world_size", 1)),
                           time=str(body.get("time", "")), format_version=version)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{source} is malformed: {exc!r}") from exc
        for name, entry in files.items():
            if not _FILE_RE.match(name) or ".." in name or not _HEX64.match(entry.sha256) or entry.size < 0:
                raise CorruptCheckpointError(f"{source} lists an invalid file entry {name!r}")
        return manifest

    def file_for(self, component: str) -> Optional[str]:
        """The file holding ``component`` (``'model'``, ``'optimizer'``, ...), or None."""
        name = self.components.get(component)
        return name if isinstance(name, str) else None

    def rng_file(self, rank: int) -> Optional[str]:
        """The RNG file written by ``rank``, or None."""
        table = self.components.get("rng") or {}
        return table.get(str(rank)) if isinstance(table, dict) else None


def _render(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- hashing streams


class HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them on the way out."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._fh = fileobj
        self._sha = Sha256Pipeline()
        self.size = 0

    def write(self, data: Any) -> int:
        """Write ``data`` (bytes-like) through to the wrapped file, hashing it beside the write."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), PIECE):
            piece = view[start:start + PIECE]
            self._sha.update(piece)
            self._fh.write(piece)
        self.size += len(view)
        return len(view)

    def entry(self) -> FileEntry:
        """The size and sha256 of everything written so far (call once, after the last write)."""
        return FileEntry(self.size, self._sha.hexdigest())


class HashingReader:
    """A read-only file wrapper that counts (and, with ``digest``, hashes) every byte read.

    It lets a loader verify a file in the same pass that parses it.
    """

    def __init__(self, fileobj: IO[bytes], digest: bool = True) -> None:
        self._fh = fileobj
        self._sha = Sha256Pipeline() if digest else None
        self.size = 0

    def _seen(self, data: Any) -> None:
        if self._sha is not None:
            self._sha.update(data)
        self.size += len(data)

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all when negative)."""
        data = self._fh.read(n)
        self._seen(data)
        return data

    def readinto(self, buf: Any) -> int:
        """Read into a writable buffer (at most one piece at a time, so hashing overlaps the next read)."""
        view = memoryview(buf).cast("B")
        if self._sha is not None:
            view = view[:PIECE]
        if hasattr(self._fh, "readinto"):
            n = self._fh.readinto(view) or 0
        else:
            data = self._fh.read(len(view))
            n = len(data)
            view[:n] = data
        self._seen(view[:n])
        return n

    def finish(self) -> FileEntry:
        """Read whatever is left and return the size and sha256 (empty without ``digest``) of the stream."""
        while self.read(CHUNK):
            pass
        return FileEntry(self.size, self._sha.hexdigest() if self._sha is not None else "")


# --------------------------------------------------------------------------- verification


def check_sizes(manifest: Manifest, present: Mapping[str, int], source: str) -> None:
    """Compare the manifest's sizes with a listing of the step directory.

    Raises:
        CorruptCheckpointError: a listed file is missing.
        ChecksumError: a file has another size than recorded (truncated or appended to).
    """
    for name, entry in sorted(manifest.files.items()):
        if name not in present:
            raise CorruptCheckpointError(f"{source}: {name} is listed in the manifest but missing")
        if present[name] != entry.size:
            raise ChecksumError(f"{source}: {name} is {present[name]} bytes, the manifest recorded {entry.size}")


def compare(name: str, got: FileEntry, want: FileEntry, source: str) -> None:
    """Raise ChecksumError when ``got`` differs from ``want``."""
    if got.size != want.size:
        raise ChecksumError(f"{source}: {name} is {got.size} bytes, the manifest recorded {want.size}")
    if got.sha256 != want.sha256:
        raise ChecksumError(f"{source}: sha256 of {name} is {got.sha256[:16]}..., "
                            f"the manifest recorded {want.sha256[:16]}...")


def verify_file(uri: str, name: str, want: FileEntry, source: str,
                storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Stream one file and check its size and sha256.

    Raises:
        ChecksumError: the bytes differ from the manifest.
        CorruptCheckpointError: the file is missing.
    """
    try:
        with storage.open_read(uri, storage_options) as fh:
            got = HashingReader(fh).finish()
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{source}: {name} is listed in the manifest but missing") from exc
    compare(name, got, want, source)
