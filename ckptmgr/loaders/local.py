"""Loader for local paths and ``file://`` URLs: files, manager checkpoint directories, safetensors shard directories."""
from __future__ import annotations

import os
from typing import Any, Optional

from ..errors import CheckpointNotFoundError
from ..format.checkpoint_file import load_checkpoint_file
from ..format.maplocation import MapLocation
from ..io.access import open_store
from ..io.store import Options
from ..io.uri import local_path

__all__ = ["load_from_local", "load_file", "load_directory"]


def load_file(uri: str, map_location: MapLocation = None, trust_pickle: bool = False,
              storage_options: Options = None) -> Any:
    """Load one checkpoint file (``.pth`` or safetensors) from any URI storage can open."""
    store = open_store(uri, storage_options)
    with store.open_read() as fh:
        size = getattr(fh, "size", None)
        if size is None and store.is_local:
            size = os.fstat(fh.fileno()).st_size
        return load_checkpoint_file(fh, name=uri, size=size, map_location=map_location, trust_pickle=trust_pickle)


def load_directory(uri: str, map_location: MapLocation = None, storage_options: Options = None,
                   model_name: Optional[str] = None) -> Any:
    """Load the model weights of a CheckpointManager directory (or one of its step directories).

    ``model_name`` picks one model of a step saved with a dict of models. A
    directory of safetensors shards with ``model.safetensors.index.json`` (the
    Hugging Face layout ``ckptmgr convert`` writes) loads as one state dict.
    """
    from .hf import is_hf_directory, load_hf_directory
    store = open_store(uri, storage_options)
    if is_hf_directory(store):
        return load_hf_directory(store, map_location)
    from .directory import load_manager_checkpoint  # only directories need the step layer
    return load_manager_checkpoint(uri, map_location=map_location, storage_options=storage_options,
                                   model_name=model_name)


def load_from_local(filename: str, map_location: MapLocation = None, trust_pickle: bool = False,
                    model_name: Optional[str] = None) -> Any:
    """Load a local file or manager directory.

    Args:
        filename: A path, ``~`` expanded, or a ``file://`` URL.
        map_location: As for ``torch.load``.
        trust_pickle: Allow arbitrary pickle (only for files from a trusted source).
        model_name: Which model of a manager step saved with a dict of models
            (files ignore it; ``load_checkpoint`` selects from them).

    Raises:
        CheckpointNotFoundError: the path does not exist.
    """
    path = local_path(str(filename))
    if os.path.isdir(path):
        return load_directory(path, map_location=map_location, model_name=model_name)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    return load_file(path, map_location=map_location, trust_pickle=trust_pickle)


