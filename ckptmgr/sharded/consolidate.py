"""A sharded step as one full state dict, or one weights file, in a single process without a process group.

Sharded steps are written by N ranks; inspecting, converting or publishing
them must not need N ranks. DCP rebuilds the full tensors from the metadata
(through the same verifying reader a restore uses).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional

import torch

from ..errors import CheckpointFormatError
from ..format.checkpoint_file import kind_of, write_checkpoint_file
from ..format.manifest import MANIFEST_NAME, Manifest, check_sizes
from ..format.signing import load_key
from ..io.access import atomic_write, open_store
from ..io.store import Options, Store

__all__ = ["consolidate", "export"]


def _as_store(step: Any, storage_options: Options) -> Store:
    return step if isinstance(step, Store) else open_store(str(step).rstrip("/") or str(step), storage_options)


def consolidate(step_uri: Any, storage_options: Options = None, verify: bool = True,
                optimizer: bool = False, signing_key: Any = None) -> "OrderedDict[str, Any]":
    """The full (unsharded) model state dict of a sharded step, in this process, without a process group.

    Args:
        step_uri: A committed sharded step directory (``.../step_00000100``), or its Store.
        storage_options: fsspec options for URLs.
        verify: Check every file's checksum (sizes and the metadata's checksum are always checked).
        optimizer: Return ``{'model': ..., 'optimizer': {name: ...}}`` instead of the model state dict.
        signing_key: The manifest must be signed with this key (see
            :func:`ckptmgr.format.signing.load_key`; None: ``CKPTMGR_SIGNING_KEY`` if set).

    Returns:
        Bare model keys -> full CPU tensors (or the dict above).

    Raises:
        CheckpointNotFoundError: no manifest (the step never committed).
        CheckpointFormatError: the step is not sharded.
        ChecksumError, CorruptCheckpointError: a file differs from the manifest.
        SignatureError: a key is given and the manifest is not signed with it.
        UnsafeCheckpointError: DCP's metadata names anything its allowlist does not hold.
    """
    from . import dcp_io
    from .engine import check_files, dcp_load
    store = _as_store(step_uri, storage_options)
    manifest = Manifest.from_bytes(store.read_bytes(MANIFEST_NAME), source=store.uri(MANIFEST_NAME))
    key = load_key(signing_key)
    if key is not None:
        key.check(manifest, store.uri(MANIFEST_NAME))
    if not isinstance(manifest.components.get("sharded"), dict):
        raise CheckpointFormatError(f"{store.root} is not a sharded checkpoint",
                                    "load it with ckptmgr.load_checkpoint or CheckpointManager.restore")
    check_sizes(manifest, store.list_files(), store.root)
    check_files(store, manifest, verify)
    target: Dict[str, Any] = {}
    keys = None if optimizer else {"model"}
    dcp_load(target, store, manifest, dcp_io.SafeEmptyLoadPlanner(keys=keys), None, no_dist=True)
    model = OrderedDict(target.get("model") or {})
    return model if not optimizer else OrderedDict(model=model, optimizer=target.get("optimizer") or {})


def export(step_uri: Any, dst: str, storage_options: Optional[Dict[str, Any]] = None, verify: bool = True,
           signing_key: Any = None) -> str:
    """Write the consolidated model weights of a sharded step as one file: safetensors unless ``dst`` ends in .pth/.pt.

    Args:
        step_uri: A committed sharded step directory.
        dst: Destination path or URL; ``.safetensors`` is appended when it has no known extension.
        storage_options: fsspec options for ``step_uri`` and ``dst``.
        verify, signing_key: As for :func:`consolidate`.

    Returns:
        The path written.

    Raises:
        As :func:`consolidate`; nothing is written then.
    """
    weights = consolidate(step_uri, storage_options, verify, signing_key=signing_key)
    if not dst.endswith((".safetensors", ".pth", ".pt")):
        dst = f"{dst}.safetensors"
    tensors = OrderedDict((k, v.contiguous()) for k, v in weights.items() if isinstance(v, torch.Tensor))
    with atomic_write(dst, storage_options) as fh:
        write_checkpoint_file(fh, kind_of(dst), {"state_dict": tensors})
    return dst
