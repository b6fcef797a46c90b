"""The manifest: the commit record of one checkpoint step.

A CheckpointManager checkpoint is a directory ``step_00000100/`` (a prefix on
object stores) holding data files and, written last, ``manifest.json``: the
step, the size and checksum of every data file (the algorithm named at the top,
``"checksum"``, and as the key of each entry; a manifest without that key is
sha256, as ckptmgr 0.1 wrote), the metrics, and which file holds which
component. A checkpoint exists for readers only when its manifest
parses and its own checksum matches, so a torn, half-deleted or bit-flipped
checkpoint is never mistaken for a good one. This module owns that format and
the comparisons of files against it; where the manifest is written is the
step layer's business.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..errors import CheckpointError, CheckpointFormatError, ChecksumError, CorruptCheckpointError
from ..io.store import Store
from .checksum import CHECKSUMS, FileEntry, HashingReader, hex_digits

__all__ = ["MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "FileEntry", "Manifest", "version_for", "check_sizes",
           "compare", "verify_file", "damaged_range"]

MANIFEST_NAME = "manifest.json"
FORMAT = "ckptmgr.checkpoint"
#: The newest layout this code reads. Version 1 (ckptmgr 0.1): sha256 only; version 2: the checksum is named.
FORMAT_VERSION = 2

_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)?$")
_HEX = re.compile(r"^[0-9a-f]+$")
#: The smallest part size a manifest may name (this code writes 4 MiB parts): a crafted manifest with
#: tiny parts would only make a restore slow, hashing a few bytes per part.
_MIN_PART = 64 * 1024


def version_for(checksum: str) -> int:
    """The lowest format version that can record files hashed with ``checksum``.

    sha256 manifests stay version 1, byte for byte the layout ckptmgr 0.1
    wrote; any other checksum needs version 2, which 0.1 refuses with
    "upgrade ckptmgr" (it could not verify the files).
    """
    return 1 if checksum == "sha256" else 2



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
        checksum: The algorithm of every file's digest (``'xxh3'`` or ``'sha256'``).
        format_version: Layout version (readers refuse newer ones); 0 picks
            the lowest one that can record ``checksum`` (:func:`version_for`).
        signature: ``{'algorithm', 'key_id', 'hmac'}`` of a signed manifest
            (see :mod:`ckptmgr.format.signing`), None when unsigned.
        raw: The JSON fields it was parsed from, unknown ones included (None
            for a manifest built here); a signature is checked over these.
        retention: The retention settings of the manager that committed it
            (``max_to_keep``, ``keep_every_n_steps``, ``best_metric``, ``best_mode``,
            ``keep_best``), so tools and later managers apply the run's own rule;
            None in steps written before it was recorded.
    """

    step: int
    files: Dict[str, FileEntry]
    components: Dict[str, Any]
    metrics: Dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    time: str = ""
    checksum: str = "sha256"
    format_version: int = 0
    signature: Optional[Dict[str, str]] = None
    raw: Optional[Dict[str, Any]] = field(default=None, repr=False, compare=False)
    retention: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        if not self.format_version:
            self.format_version = version_for(self.checksum)

    def _body(self) -> Dict[str, Any]:
        body = {
            "format": FORMAT, "format_version": self.format_version, "step": self.step,
            "time": self.time, "world_size": self.world_size, "metrics": self.metrics,
            "components": self.components,
            "files": {name: _entry_json(e, self.checksum) for name, e in sorted(self.files.items())},
        }
        if self.checksum != "sha256":  # absent means sha256: a sha256 manifest is laid out as 0.1 wrote it
            body["checksum"] = self.checksum
        if self.retention is not None:  # an optional field: older readers ignore it, older manifests lack it
            body["retention"] = self.retention
        if self.signature is not None:  # unsigned manifests stay byte for byte what earlier versions wrote
            body["signature"] = dict(self.signature)
        return body

    def content(self) -> Dict[str, Any]:
        """The JSON fields without the self-checksum: as parsed (unknown fields included), else as built."""
        return copy.deepcopy(self.raw) if self.raw is not None else self._body()

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
        checksum = body.get("checksum", "sha256")
        if checksum not in CHECKSUMS:
            raise CheckpointFormatError(f"{source} uses the checksum {checksum!r}; this ckptmgr knows "
                                        f"{', '.join(CHECKSUMS)}", "upgrade ckptmgr to read this checkpoint")
        try:
            files = {str(n): _entry(e, checksum) for n, e in body["files"].items()}
            manifest = cls(step=int(body["step"]), files=files, components=dict(body["components"]),
                           metrics=dict(body.get("metrics") or {}), world_size=int(body.get("world_size", 1)),
                           time=str(body.get("time", "")), checksum=checksum, format_version=version,
                           signature=_signature(body.get("signature")), raw=body,
                           retention=body["retention"] if isinstance(body.get("retention"), dict) else None)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{source} is malformed: {exc!r}") from exc
        digits = hex_digits(checksum)
        for name, entry in files.items():
            if (not _FILE_RE.match(name) or ".." in name or entry.size < 0
                    or not all(len(d) == digits and _HEX.match(d) for d in (entry.digest, *entry.parts))
                    or (entry.parts and (entry.part_size < _MIN_PART
                                         or len(entry.parts) != -(-entry.size // entry.part_size)))):
                raise CorruptCheckpointError(f"{source} lists an invalid file entry {name!r}")
        return manifest

    def file_for(self, component: str) -> Optional[str]:
        """The file holding ``component`` (``'model'``, ``'optimizer'``, ...), or None."""
        name = self.components.get(component)
        return name if isinstance(name, str) else None

    def model_names(self) -> List[str]:
        """The names of the step's models: ``['model']`` for one module, else the names of a dict of models."""
        sharded = self.components.get("sharded")
        names = sharded.get("models") if isinstance(sharded, dict) else None
        if names:
            return sorted(str(n) for n in names)
        table = self.components.get("models")
        if isinstance(table, dict) and table:
            return sorted(str(n) for n in table)
        return ["model"]

    def rng_file(self, rank: int) -> Optional[str]:
        """The RNG file written by ``rank``, or None."""
        table = self.components.get("rng") or {}
        return table.get(str(rank)) if isinstance(table, dict) else None


def _entry_json(entry: FileEntry, checksum: str) -> Dict[str, Any]:
    """A file's manifest entry: ``{"size", <checksum>: digest}``, and its part digests when it has them."""
    out: Dict[str, Any] = {"size": entry.size, checksum: entry.digest}
    if entry.parts:  # an optional field (format may grow): readers without it verify the whole-file digest
        out["parts"] = {"size": entry.part_size, checksum: list(entry.parts)}
    return out


def _entry(value: Mapping[str, Any], checksum: str) -> FileEntry:
    """Parse a file's manifest entry (see :func:`_entry_json`); a malformed one raises KeyError/TypeError/ValueError."""
    parts = value.get("parts")
    if parts is None:
        return FileEntry(int(value["size"]), str(value[checksum]))
    digests = parts[checksum]
    if not isinstance(digests, list):
        raise TypeError(f"part digests must be a list, not {type(digests).__name__}")
    return FileEntry(int(value["size"]), str(value[checksum]), tuple(str(d) for d in digests), int(parts["size"]))


def _signature(value: Any) -> Optional[Dict[str, str]]:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"signature must be an object of strings, not {value!r}")
    return dict(value)


def _render(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()




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


def compare(name: str, got: FileEntry, want: FileEntry, source: str, checksum: str) -> None:
    """Raise ChecksumError when ``got`` differs from ``want`` (digests of algorithm ``checksum``).

    ``got`` holding part digests (a reader verified part by part) is compared
    part by part with ``want``'s, and the error names the first damaged byte
    range; otherwise the whole-file digests are compared.
    """
    if got.size != want.size:
        raise ChecksumError(f"{source}: {name} is {got.size} bytes, the manifest recorded {want.size}")
    if got.parts:
        if (got.part_size, got.parts) != (want.part_size, want.parts):
            bad = _first_bad_part(got, want) or 0
            recorded = want.parts[bad][:16] if bad < len(want.parts) else "-"
            raise ChecksumError(f"{source}: {name} has {checksum} {got.parts[bad][:16]}... in "
                                f"{_part_bytes(got, bad)} where the manifest recorded {recorded}... (its bytes "
                                f"changed after the save)")
        return
    if got.digest != want.digest:
        raise ChecksumError(f"{source}: {name} has {checksum} {got.digest[:16]}... where the manifest recorded "
                            f"{want.digest[:16]}... (its bytes changed after the save)")


def verify_file(store: Store, name: str, want: FileEntry, checksum: str) -> None:
    """Stream one file of a step (``store`` is the step directory) and check its size and ``checksum``.

    The whole-file digest is what is checked; when it differs and the entry
    has part digests, the error names the byte range of the first damaged part.

    Raises:
        ChecksumError: the bytes differ from the manifest.
        CorruptCheckpointError: the file is missing, or a link out of the directory.
    """
    store.check_inside(name)
    try:
        with store.open_read(name) as fh:
            got = HashingReader(fh, checksum).finish()
        where = damaged_range(store, name, want, checksum) if got.digest != want.digest else ""
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{store.root}: {name} is listed in the manifest but missing") from exc
    if where and got.size == want.size:
        raise ChecksumError(f"{store.root}: {name} has {checksum} {got.digest[:16]}... where the manifest recorded "
                            f"{want.digest[:16]}...; {where} changed after the save")
    compare(name, got, want, store.root, checksum)  # the whole-file digest decides, whatever the parts said


def damaged_range(store: Store, name: str, want: FileEntry, checksum: str) -> str:
    """``'bytes A-B'``: the first part of ``name`` whose digest differs from ``want``'s parts; empty without parts.

    A second pass over the file, for an error message once the whole-file
    digest has been found to differ.
    """
    if not want.parts:
        return ""
    try:
        with store.open_read(name) as fh:
            got = HashingReader(fh, checksum, want).finish()
    except (OSError, CheckpointError):  # only a message depends on it; the caller reports the mismatch anyway
        return ""
    bad = _first_bad_part(got, want)
    return "" if bad is None else _part_bytes(got, bad)


def _first_bad_part(got: FileEntry, want: FileEntry) -> Optional[int]:
    """The index of the first part whose digest in ``got`` differs from ``want``'s, or None."""
    return next((i for i, (a, b) in enumerate(zip(got.parts, want.parts)) if a != b), None)


def _part_bytes(entry: FileEntry, index: int) -> str:
    """``'bytes A-B'``: the byte range of part ``index`` of the file ``entry`` describes."""
    first = index * entry.part_size
    return f"bytes {first}-{min(first + entry.part_size, entry.size) - 1}"
