"""The table of built-in schemes, registered into CheckpointLoader on first use."""
from __future__ import annotations

from typing import Dict

from .fsspec import fsspec_knows, load_from_fsspec
from .local import load_from_local

__all__ = ["BUILTIN_SCHEMES", "load_from_local", "load_from_fsspec", "fsspec_knows"]

BUILTIN_SCHEMES: Dict[str, object] = {
    "file://": load_from_local,
    "s3://": load_from_fsspec,
    "memory://": load_from_fsspec,
}
