"""URIs as ckptmgr speaks them: a local path, ``file://``, or ``scheme://...`` for fsspec.

Pure string functions, no I/O: they decide which storage backend a URI
belongs to and how names are joined onto it.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

__all__ = ["OBJECT_STORES", "split_protocol", "has_scheme", "is_local", "local_path", "join"]

#: Protocols whose writes are whole-object uploads (no rename, no partial objects).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def split_protocol(uri: str) -> Tuple[Optional[str], str]:
    """Split ``'s3://b/k'`` into ``('s3', 'b/k')``; a plain path gives ``(None, path)``."""
    match = _SCHEME_RE.match(uri)
    if not match:
        return None, uri
    return match.group(1).lower(), uri[match.end():]


def has_scheme(uri: str) -> bool:
    """True when ``uri`` starts with ``scheme://``."""
    return bool(_SCHEME_RE.match(uri))


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    protocol, _ = split_protocol(uri)
    return protocol in (None, "file", "local")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (``file:///x`` -> ``/x``), user-expanded."""
    return os.path.expanduser(split_protocol(uri)[1] if is_local(uri) else uri)


def join(base: str, *parts: str) -> str:
    """Join path components onto a URI or path with ``/`` (empty parts are skipped)."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = f"{out}/{part}" if out else part
    return out
