"""Single-file checkpoints (``.pth`` / ``.safetensors``): the one writer, and the loader of any such file.

OpenMMLab's layout is a dict ``{'meta': ..., 'state_dict': ..., 'optimizer': ...}``.
:func:`write_checkpoint_file` writes it for ``save_checkpoint``, ``convert``,
``publish`` and the sharded export alike:

* ``torch``: ``torch.save`` of the dict (loads with ``torch.load(weights_only=True)``);
* ``safetensors``: the model's tensors under their bare keys, so any safetensors
  tool reads the weights as they are; everything else (meta, optimizer state,
  non-tensor entries) is a JSON skeleton in the header under ``ckptmgr.checkpoint``,
  and the few tensors it holds are stored under names starting with ``ckptmgr.rest.``.

:func:`load_checkpoint_file` reads any checkpoint file, picking the format
from its bytes, including the two safetensors layouts ckptmgr 0.1 wrote
(``ckptmgr.skeleton`` with ``root.state_dict.*`` keys, and ``convert``'s bare
keys with ``ckptmgr.meta``). Other safetensors files load as a flat dict of tensors.
"""
from __future__ import annotations

import io
import json
import struct
from collections import OrderedDict
from typing import IO, Any, Dict, Mapping, MutableMapping, Optional

import torch

from ..errors import CorruptCheckpointError
from .maplocation import MapLocation
from .safetensors import MAX_HEADER_BYTES, read_safetensors, write_safetensors
from .skeleton import SKELETON_KEY, from_skeleton, to_skeleton
from .torchfile import load_torch, save_torch

__all__ = ["CHECKPOINT_KEY", "MODULE_META_KEY", "kind_of", "write_checkpoint_file", "sniff_format",
           "load_checkpoint_file"]

#: Header key of the skeleton of everything but the model's tensors (ckptmgr 0.2 and later).
CHECKPOINT_KEY = "ckptmgr.checkpoint"
#: Header key of the module versions (``state_dict._metadata``) of a weights file.
MODULE_META_KEY = "ckptmgr.module_metadata"
_LEGACY_META_KEY = "ckptmgr.meta"  # `ckptmgr convert` in 0.1: bare keys, meta as JSON
_REST = "ckptmgr.rest"


def kind_of(name: str) -> str:
    """``'safetensors'`` for a ``.safetensors`` name, ``'torch'`` for anything else."""
    return "safetensors" if str(name).endswith(".safetensors") else "torch"


def write_checkpoint_file(fh: IO[bytes], kind: str, checkpoint: Mapping[str, Any],
                          weights: Optional[str] = "state_dict") -> None:
    """Write a checkpoint dict (``state_dict`` required; ``meta``, ``optimizer``, ... optional) to ``fh``.

    Args:
        fh: A binary file open for writing (an atomic write of ckptmgr.io).
        kind: ``'torch'`` or ``'safetensors'`` (see :func:`kind_of`).
        checkpoint: The dict to store; its ``state_dict`` keeps ``_metadata`` (module versions).
        weights: (safetensors) the key of the model state dict, whose tensors are stored
            under their bare keys; ``''`` when ``checkpoint`` is itself the state dict, None
            when it holds none (everything goes into the header skeleton).

    Raises:
        UnserializableStateError: (safetensors) a value cannot be stored without pickle.
    """
    if kind == "torch":
        save_torch(checkpoint if isinstance(checkpoint, dict) else dict(checkpoint), fh)
        return
    if weights == "":
        state_dict: Mapping[str, Any] = checkpoint
        rest: Dict[Any, Any] = {}
    elif weights is None:
        state_dict, rest = {}, dict(checkpoint)
    else:
        state_dict = checkpoint.get(weights) or {}
        rest = {k: v for k, v in checkpoint.items() if k != weights}
    tensors: MutableMapping[str, torch.Tensor] = OrderedDict(
        (k, v) for k, v in state_dict.items() if isinstance(v, torch.Tensor))
    others = {k: v for k, v in state_dict.items() if not isinstance(v, torch.Tensor)}
    rest_skeleton, tensors = to_skeleton(rest, tensors, path=_REST)
    others_skeleton, tensors = to_skeleton(others, tensors, path=f"{_REST}.state_dict")
    skeleton = {"rest": rest_skeleton, "state_dict_others": others_skeleton, "order": [str(k) for k in state_dict]}
    if weights != "state_dict":  # absent (older files and the default): the weights are under "state_dict"
        skeleton["weights"] = weights
    metadata = {"format": "pt", CHECKPOINT_KEY: json.dumps(skeleton, allow_nan=False)}
    module_meta = getattr(state_dict, "_metadata", None)
    if module_meta:
        metadata[MODULE_META_KEY] = json.dumps({k: dict(v) for k, v in module_meta.items()})
    write_safetensors(fh, tensors, metadata)


def _decode(tensors: "OrderedDict[str, torch.Tensor]", metadata: Mapping[str, str], name: str) -> Any:
    """The checkpoint a ckptmgr safetensors file holds (any layout), or the flat tensors of a foreign one."""
    try:
        if CHECKPOINT_KEY in metadata:
            skeleton = json.loads(metadata[CHECKPOINT_KEY])
            rest = from_skeleton(skeleton["rest"], tensors)
            others = from_skeleton(skeleton["state_dict_others"], tensors)
            state: "OrderedDict[str, Any]" = OrderedDict(
                (key, others[key] if key in others else tensors[key]) for key in skeleton["order"])
            if MODULE_META_KEY in metadata:
                state._metadata = OrderedDict(json.loads(metadata[MODULE_META_KEY]))  # type: ignore[attr-defined]
            weights = skeleton.get("weights", "state_dict")
            if weights == "":
                return state
            if weights is not None:
                rest[weights] = state
            return rest
        if SKELETON_KEY in metadata:  # 0.1 save_checkpoint: the whole dict as a skeleton
            return from_skeleton(json.loads(metadata[SKELETON_KEY]), tensors)
        if _LEGACY_META_KEY in metadata:  # 0.1 convert: bare keys + meta
            return OrderedDict(meta=json.loads(metadata[_LEGACY_META_KEY]), state_dict=tensors)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{name or 'file'}: the ckptmgr header metadata is damaged ({exc!r})") from exc
    return tensors


def sniff_format(head: bytes, name: str = "") -> str:
    """Guess a file's format from its first bytes (and name).

    Returns:
        ``'safetensors'``, ``'torch'`` (zip or legacy pickle) or ``'unknown'``.
    """
    if name.endswith(".safetensors"):
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= MAX_HEADER_BYTES:
            return "safetensors"
    return "unknown"


def load_checkpoint_file(fileobj: IO[bytes], name: str = "", size: Optional[int] = None,
                         map_location: MapLocation = None, trust_pickle: bool = False) -> Any:
    """Load a checkpoint from an open binary stream, picking the format from its bytes.

    Args:
        fileobj: The file, positioned at its start (non-seekable streams are buffered).
        name: Its name or URI, for messages and the format guess.
        size: Its size when known (bounds checks for safetensors).
        map_location: As for ``torch.load``.
        trust_pickle: Allow arbitrary pickle code (only for files from a trusted source).

    Returns:
        The checkpoint dict (see the module docstring for safetensors layouts).

    Raises:
        UnsafeCheckpointError: the file needs pickle code and ``trust_pickle`` is False.
        CorruptCheckpointError: the file is empty, truncated or not a checkpoint.
    """
    if not getattr(fileobj, "seekable", lambda: False)():
        fileobj = io.BytesIO(fileobj.read())
    start = fileobj.tell()
    head = fileobj.read(16)
    fileobj.seek(start)
    kind = sniff_format(head, name)
    if kind == "safetensors":
        tensors, metadata = read_safetensors(fileobj, size, map_location)
        return _decode(tensors, metadata, name)
    if kind == "unknown" and not head:
        raise CorruptCheckpointError(f"{name or 'checkpoint'} is empty (0 bytes)")
    return load_torch(fileobj, map_location, trust_pickle, source=name or "checkpoint")


