"""DCP's files inside a step directory, recognised and checked without importing DCP.

DCP writes one data file per rank (``__<rank>_<n>.distcp``) and one metadata
file. Manifest names never start with a dot, so the metadata is stored as
``dcp.metadata`` instead of DCP's ``.metadata``.
"""
from __future__ import annotations

import re
from typing import Optional

from ..format.checksum import FileEntry, digest_of
from ..format.manifest import compare

__all__ = ["METADATA_NAME", "FORMAT", "is_data_file", "check_metadata_bytes"]

METADATA_NAME = "dcp.metadata"
#: ``components['sharded']['format']`` of a sharded step.
FORMAT = "torch.distributed.checkpoint"
_DATA_RE = re.compile(r"^__(\d+)_\d+\.distcp$")


def is_data_file(name: str, rank: Optional[int] = None) -> bool:
    """True for a DCP data file name (written by ``rank`` when given)."""
    match = _DATA_RE.match(name.rsplit("/", 1)[-1])
    if match is None:
        return False
    return rank is None or int(match.group(1)) == rank


def check_metadata_bytes(data: bytes, want: FileEntry, source: str, checksum: str) -> None:
    """Compare DCP metadata bytes with their manifest entry (size and the manifest's ``checksum``, always).

    Raises:
        ChecksumError: the bytes differ; they must not be unpickled.
    """
    compare(METADATA_NAME, FileEntry(len(data), digest_of(data, checksum)), want, source, checksum)
