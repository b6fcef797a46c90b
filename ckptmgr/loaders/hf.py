"""Loading a Hugging Face-style directory: safetensors shards named by ``model.safetensors.index.json``.

``ckptmgr convert SRC DIR`` (and ``transformers``' ``save_pretrained``) write
big models as shards plus an index; ``load_checkpoint(model, DIR)`` and
``CheckpointManager(init_from=DIR)`` should read them back like one file.
Every shard goes through the same no-pickle safetensors reader as single
files, and the index may only name files inside its directory.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Mapping

from ..errors import CorruptCheckpointError
from ..format.checkpoint_file import load_checkpoint_file
from ..format.hf_layout import INDEX_NAME, parse_index
from ..format.maplocation import MapLocation
from ..io.store import Store

__all__ = ["is_hf_directory", "load_hf_directory"]


def is_hf_directory(store: Store) -> bool:
    """True when the directory holds a ``model.safetensors.index.json``."""
    return store.exists(INDEX_NAME)


def load_hf_directory(store: Store, map_location: MapLocation = None) -> Dict[str, Any]:
    """Load every shard an index names: ``{'state_dict': ..., 'meta': ...}`` (meta from ckptmgr's shards).

    Raises:
        CorruptCheckpointError: the index is malformed, or a shard lacks a key the index puts in it.
        CheckpointNotFoundError: a shard is missing.
    """
    weight_map = parse_index(store.read_bytes(INDEX_NAME), store.uri(INDEX_NAME))
    state: "OrderedDict[str, Any]" = OrderedDict()
    meta: Mapping[str, Any] = {}
    loaded: Dict[str, Mapping[str, Any]] = {}
    for name in dict.fromkeys(weight_map.values()):  # each shard once, in index order
        with store.open_read(name) as fh:
            ckpt = load_checkpoint_file(fh, name=store.uri(name), size=store.size(name), map_location=map_location)
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):  # written by ckptmgr
            meta = ckpt.get("meta") or meta
            ckpt = ckpt["state_dict"]
        loaded[name] = ckpt
    for key, name in weight_map.items():
        if key not in loaded[name]:
            raise CorruptCheckpointError(f"{store.uri(name)} lacks {key!r}, which {INDEX_NAME} puts there")
        state[key] = loaded[name][key]
    return {"state_dict": state, "meta": dict(meta)}
