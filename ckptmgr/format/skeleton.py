"""A JSON "skeleton" of nested state, with the tensors taken out: structure without pickle.

Optimizer state, scheduler state, RNG streams and user values are nested
dicts, lists and tuples of numbers, strings and tensors. :func:`to_skeleton`
splits such a tree into JSON (tensors replaced by ``{"__tensor__": name}``,
tuples, bytes, numpy arrays, dtypes and non-finite floats tagged) and a flat
dict of tensors that a safetensors file stores; :func:`from_skeleton` puts
the exact tree back together. Anything else needs pickle and is refused.
"""
from __future__ import annotations

import base64
import math
import sys
from collections import OrderedDict
from typing import Any, Mapping, MutableMapping, Optional, Tuple

import torch

from ..errors import CorruptCheckpointError, UnserializableStateError

__all__ = ["SKELETON_KEY", "to_skeleton", "from_skeleton"]

#: Header metadata key under which a safetensors file carries its skeleton.
SKELETON_KEY = "ckptmgr.skeleton"



def to_skeleton(obj: Any, tensors: Optional[MutableMapping[str, torch.Tensor]] = None,
                path: str = "") -> Tuple[Any, MutableMapping[str, torch.Tensor]]:
    """Split ``obj`` into a JSON-serialisable skeleton and a flat dict of tensors.

    Tensors are replaced by ``{"__tensor__": name}``; tuples, non-string dict
    keys, non-finite floats, bytes, numpy arrays, dtypes and devices get small
    tagged encodings so :func:`from_skeleton` rebuilds the exact object.

    Args:
        obj: Nested dicts/lists/tuples of tensors and plain values.
        tensors: Dict to add tensors to (a new one when None).
        path: Key prefix for tensor names (used in error messages too).

    Returns:
        ``(skeleton, tensors)``.

    Raises:
        UnserializableStateError: an object that cannot be stored without pickle.
    """
    if tensors is None:
        tensors = OrderedDict()
    return _encode(obj, tensors, path or "root"), tensors


def _tensor_name(tensors: Mapping[str, Any], path: str) -> str:
    name, n = path, 1
    while name in tensors:
        n += 1
        name = f"{path}#{n}"
    return name


def _encode(obj: Any, tensors: MutableMapping[str, torch.Tensor], path: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        name = _tensor_name(tensors, path)
        tensors[name] = obj
        return {"__tensor__": name}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors, f"{path}.<key>"), _encode(v, tensors, f"{path}.{k}")]
                             for k, v in obj.items()]}
    if isinstance(obj, torch.Size):
        return {"__tuple__": [int(x) for x in obj]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).replace("torch.", "")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        if isinstance(obj, numpy.ndarray):
            return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape),
                                    "data": base64.b64encode(numpy.ascontiguousarray(obj).tobytes()).decode("ascii")}}
        if isinstance(obj, numpy.generic):
            return _encode(obj.item(), tensors, path)
    raise UnserializableStateError(f"cannot store {type(obj).__name__} at '{path}' without pickle")


def from_skeleton(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the object that :func:`to_skeleton` split.

    Raises:
        CorruptCheckpointError: the skeleton names a tensor that is missing, or a tag is malformed.
    """
    try:
        return _decode(skeleton, tensors)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptCheckpointError(f"checkpoint structure is inconsistent: {exc!r}") from exc


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (tag, value), = node.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return OrderedDict((_decode(k, tensors), _decode(v, tensors)) for k, v in value)
        if tag == "__float__":
            return float(value)
        if tag == "__bytes__":
            return base64.b64decode(value)
        if tag == "__dtype__":
            return getattr(torch, value)
        if tag == "__device__":
            return torch.device(value)
        if tag == "__ndarray__":
            import numpy
            arr = numpy.frombuffer(base64.b64decode(value["data"]), dtype=numpy.dtype(value["dtype"]))
            return arr.reshape(value["shape"]).copy()
    return OrderedDict((k, _decode(v, tensors)) for k, v in node.items())


