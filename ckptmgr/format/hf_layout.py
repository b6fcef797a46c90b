"""The Hugging Face sharded-weights layout: ``model-00001-of-0000N.safetensors`` files and their index.

Inference servers and ``transformers`` load big models from a directory of
safetensors shards plus ``model.safetensors.index.json``::

    {"metadata": {"total_size": <bytes of every tensor>}, "weight_map": {key: shard file name}}

This module plans which keys go into which shard (in state-dict order, a new
shard whenever the next tensor would pass the size limit, as ``transformers``
does), names the shards, and writes and reads the index. Writing the shards
is the single-file writer's job (:mod:`ckptmgr.format.checkpoint_file`).
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from ..errors import CorruptCheckpointError

__all__ = ["INDEX_NAME", "shard_name", "parse_size", "tensor_bytes", "plan_shards", "build_index", "parse_index"]

INDEX_NAME = "model.safetensors.index.json"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_name(index: int, count: int) -> str:
    """``model-00001-of-00003.safetensors`` for ``index`` 1 of ``count`` 3 (``index`` counts from 1)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def parse_size(size: Union[int, str, None]) -> Optional[int]:
    """Bytes from ``5GB`` (decimal units, as transformers reads them), ``5GiB`` (binary), or an int.

    Raises:
        ValueError: not a positive size.
    """
    if size is None:
        return None
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a size such as '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_RE.match(str(size))
        if match is None:
            raise ValueError(f"max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's data takes in a safetensors file."""
    return tensor.numel() * tensor.element_size()


def plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: Optional[int]) -> List[List[str]]:
    """Keys per shard, in order: a shard closes when the next tensor would take it past ``max_bytes``.

    A tensor larger than ``max_bytes`` gets a shard of its own (it cannot be split).
    With ``max_bytes`` None everything goes into one shard.
    """
    shards: List[List[str]] = [[]]
    filled = 0
    for key, tensor in tensors.items():
        size = tensor_bytes(tensor)
        if max_bytes is not None and shards[-1] and filled + size > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += size
    return shards if shards[0] else []


def build_index(plan: List[List[str]], tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The index file for a plan from :func:`plan_shards` (shard names from :func:`shard_name`)."""
    weight_map = {key: shard_name(i + 1, len(plan)) for i, keys in enumerate(plan) for key in keys}
    body = {"metadata": {"total_size": sum(tensor_bytes(t) for t in tensors.values())}, "weight_map": weight_map}
    return json.dumps(body, indent=2, sort_keys=False).encode("utf-8") + b"\n"


def parse_index(data: bytes, source: str = INDEX_NAME) -> Dict[str, str]:
    """The weight map of an index file: key -> shard file name (names checked: no paths).

    Raises:
        CorruptCheckpointError: not an index of this layout.
    """
    try:
        body: Any = json.loads(data.decode("utf-8"))
        weight_map = body["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{source} is not a safetensors index ({exc!r})") from exc
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
            and not v.startswith(".") for k, v in weight_map.items()):
        raise CorruptCheckpointError(f"{source}: weight_map must map keys to .safetensors file names in its "
                                     "directory")
    return dict(weight_map)
