"""The table of built-in schemes, registered into CheckpointLoader on first use.

Plain paths and unregistered fsspec protocols need no entry: the registry
sends them to the local and fsspec loaders itself.
"""
from __future__ import annotations

from typing import Callable, Dict

from .fsspec import fsspec_knows, load_from_fsspec
from .http import load_from_http
from .local import load_from_local
from .zoo import load_from_mmcls, load_from_openmmlab, load_from_torchvision

__all__ = ["BUILTIN_SCHEMES", "load_from_local", "load_from_fsspec", "load_from_http",
           "load_from_torchvision", "load_from_openmmlab", "load_from_mmcls", "fsspec_knows"]

BUILTIN_SCHEMES: Dict[str, Callable[..., object]] = {
    "file://": load_from_local,
    "s3://": load_from_fsspec,
    "memory://": load_from_fsspec,
    "http://": load_from_http,
    "https://": load_from_http,
    "torchvision://": load_from_torchvision,
    "modelzoo://": load_from_torchvision,
    "open-mmlab://": load_from_openmmlab,
    "openmmlab://": load_from_openmmlab,
    "mmcls://": load_from_mmcls,
}
