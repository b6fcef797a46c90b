"""Bytes on disk <-> Python objects, without ever running untrusted pickle.

Three formats:

* ``.pth`` files (``torch.save``): read with ``torch.load(weights_only=True)``
  unless the caller passes ``trust_pickle=True``.
* safetensors files: tensors only, plus a JSON "skeleton" of the surrounding
  structure (nested dicts, lists, numbers, strings) in the header metadata,
  so a whole checkpoint dict round-trips without pickle.
* plain JSON for structure (manifests, optimizer hyper-parameters, RNG state).

We read and write safetensors with our own small streaming code instead of the
``safetensors`` package's ``save_file``/``load``: that package turns every tensor
into a Python ``bytes`` copy before writing and needs either a local path (mmap)
or the whole file in memory to read, while checkpoints go to and come from
fsspec file objects and should stream tensor by tensor, reading straight into
existing parameters. The format is the published one (8-byte little-endian
header length, JSON header, raw little-endian data), and files written here
load with ``safetensors.torch.load_file`` and vice versa (tested).
"""
from __future__ import annotations

import base64
import errno
import io
import json
import math
import pickle
import struct
import sys
from collections import OrderedDict
from typing import IO, Any, Callable, Dict, Mapping, MutableMapping, Optional, Tuple, Union

import torch

from .errors import CorruptCheckpointError, UnsafeCheckpointError, UnserializableStateError

__all__ = [
    "SAFETENSORS_DTYPES", "sniff_format", "to_skeleton", "from_skeleton",
    "write_safetensors", "read_safetensors_header", "read_safetensors",
    "save_torch", "load_torch", "load_stream", "MapLocation",
]

MapLocation = Union[None, str, torch.device, Dict[str, str], Callable[..., Any]]

SAFETENSORS_DTYPES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code
_DTYPE_FROM_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in SAFETENSORS_DTYPES}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # what the safetensors reference reader also refuses past
SKELETON_KEY = "ckptmgr.skeleton"

# --------------------------------------------------------------------------- skeletons


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


# --------------------------------------------------------------------------- safetensors


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy (for contiguous CPU tensors) byte view of ``tensor``."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(fileobj: IO[bytes], tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> int:
    """Stream ``tensors`` to ``fileobj`` in safetensors format, one tensor at a time.

    Args:
        fileobj: A binary file open for writing (local or fsspec).
        tensors: Name -> tensor; any device, any layout (non-contiguous ones are copied one at a time).
        metadata: String -> string pairs stored under ``__metadata__``.

    Returns:
        Bytes written.

    Raises:
        UnserializableStateError: a dtype safetensors cannot represent, or a sparse tensor.
    """
    header: Dict[str, Any] = {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided or tensor.dtype not in SAFETENSORS_DTYPES:
            raise UnserializableStateError(
                f"tensor '{name}' ({tensor.dtype}, {tensor.layout}) cannot be stored in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    fileobj.write(struct.pack("<Q", len(raw)))
    fileobj.write(raw)
    for tensor in tensors.values():
        fileobj.write(_tensor_bytes(tensor))
    return 8 + len(raw) + offset


def read_safetensors_header(fileobj: IO[bytes], size: Optional[int] = None) -> Tuple[Dict[str, Any], int]:
    """Read and validate a safetensors header.

    Args:
        fileobj: Binary file positioned at the start.
        size: Total file size when known (enables bounds checks against the real file).

    Returns:
        ``(header, data_start)``: the parsed header dict and the byte offset of the data section.

    Raises:
        CorruptCheckpointError: truncated, oversized, malformed or overlapping entries.
    """
    head = fileobj.read(8)
    if len(head) != 8:
        raise CorruptCheckpointError("safetensors file is shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES or (size is not None and 8 + length > size):
        raise CorruptCheckpointError(f"safetensors header claims {length} bytes, more than the file holds")
    raw = fileobj.read(length)
    if len(raw) != length:
        raise CorruptCheckpointError("safetensors header is truncated")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError("safetensors header is not a JSON object")
    _validate_entries(header, None if size is None else size - 8 - length)
    return header, 8 + length


def _validate_entries(header: Dict[str, Any], data_size: Optional[int]) -> None:
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CorruptCheckpointError("safetensors __metadata__ must map strings to strings")
            continue
        try:
            dtype = _DTYPE_FROM_CODE[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"safetensors entry '{name}' is malformed: {exc!r}") from exc
        if any(d < 0 for d in shape) or start < 0 or end < start:
            raise CorruptCheckpointError(f"safetensors entry '{name}' has negative sizes")
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if end - start != expected:
            raise CorruptCheckpointError(
                f"safetensors entry '{name}' spans {end - start} bytes but shape {shape} needs {expected}")
        spans.append((start, end, name))
    spans.sort()
    cursor = 0
    for start, end, name in spans:
        if start != cursor:
            raise CorruptCheckpointError(f"safetensors entry '{name}' overlaps another or leaves a gap")
        cursor = end
    if data_size is not None and cursor != data_size:
        raise CorruptCheckpointError(
            f"safetensors data section is {data_size} bytes but the header describes {cursor}")


def read_safetensors(fileobj: IO[bytes], size: Optional[int] = None, map_location: MapLocation = None,
                     into: Optional[Mapping[str, torch.Tensor]] = None
                     ) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, str]]:
    """Read every tensor of a safetensors stream.

    When ``into`` has a CPU tensor of the same name, shape and dtype, bytes are
    read straight into it (no intermediate copy) and that tensor is returned.

    Args:
        fileobj: Binary file positioned at the start.
        size: Total size of the file when known, for bounds checks.
        map_location: Device (or torch-style dict) to move tensors to.
        into: Optional destination tensors to fill in place.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CorruptCheckpointError: the stream is malformed or ends early.
    """
    header, _ = read_safetensors_header(fileobj, size)
    metadata = header.pop("__metadata__", {}) or {}
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, entry in entries:
        dtype = _DTYPE_FROM_CODE[entry["dtype"]]
        shape = tuple(entry["shape"])
        target = (into or {}).get(name)
        reuse = (isinstance(target, torch.Tensor) and target.device.type == "cpu" and target.dtype == dtype
                 and tuple(target.shape) == shape and target.is_contiguous())
        tensor = target.detach() if reuse else torch.empty(shape, dtype=dtype)
        _read_exact(fileobj, _tensor_bytes(tensor), name)
        out[name] = _map(target if reuse else tensor, map_location)
    return out, metadata


def _read_exact(fileobj: IO[bytes], view: memoryview, name: str) -> None:
    view = view.cast("B") if view.format != "B" else view
    got = 0
    while got < len(view):
        n = fileobj.readinto(view[got:]) if hasattr(fileobj, "readinto") else None
        if n is None:
            chunk = fileobj.read(len(view) - got)
            n = len(chunk)
            view[got:got + n] = chunk
        if not n:
            raise CorruptCheckpointError(f"safetensors data for '{name}' ends early (truncated file)")
        got += n


def _map(tensor: torch.Tensor, map_location: MapLocation) -> torch.Tensor:
    if map_location is None:
        return tensor
    if isinstance(map_location, (str, torch.device)):
        return tensor.to(map_location)
    if isinstance(map_location, dict):
        return tensor.to(map_location.get("cpu", "cpu"))
    if callable(map_location):
        result = map_location(tensor, "cpu")
        return tensor if result is None else result
    raise TypeError(f"unsupported map_location {map_location!r}")


# --------------------------------------------------------------------------- torch.save / torch.load


def save_torch(obj: Any, fileobj: IO[bytes]) -> None:
    """``torch.save`` into an open binary file (local or fsspec)."""
    torch.save(obj, fileobj)


def load_torch(fileobj: IO[bytes], map_location: MapLocation = None, trust_pickle: bool = False,
               source: str = "checkpoint") -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller trusts the source.

    Raises:
        UnsafeCheckpointError: the file needs arbitrary pickle (classes, functions).
        CorruptCheckpointError: the file is truncated or not a torch file.
    """
    start = fileobj.tell() if getattr(fileobj, "seekable", lambda: False)() else None
    try:
        if trust_pickle:  # explicit opt-in by the caller: the only full unpickling in ckptmgr
            return torch.load(fileobj, map_location=map_location, weights_only=False)  # trust_pickle=True
        return torch.load(fileobj, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "global" in text or _plain_pickle_needing_code(fileobj, start):
            raise UnsafeCheckpointError(
                f"{source} needs arbitrary pickle code to load ({_first_reason(text)})") from exc
        raise CorruptCheckpointError(f"{source} is not a valid torch checkpoint: {_first_reason(text)}") from exc
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, OSError, struct.error,
            UnicodeDecodeError, AttributeError, TypeError, OverflowError, MemoryError) as exc:
        # A real I/O error propagates; EINVAL is a seek to an offset a damaged zip directory made up.
        if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno not in (None, errno.EINVAL):
            raise
        raise CorruptCheckpointError(
            f"{source} could not be read as a torch checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


def _plain_pickle_needing_code(fileobj: IO[bytes], start: Optional[int]) -> bool:
    """True when the stream is a well-formed plain pickle that imports or calls something.

    torch's restricted unpickler rejects some valid pickles (e.g. protocol 4
    frames) with a generic message; ``pickletools.genops`` only parses opcodes
    (it never executes them), which tells "needs arbitrary code" from "garbage".
    """
    if start is None:
        return False
    import pickletools
    try:
        fileobj.seek(start)
        return any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(fileobj))
    except Exception:  # not a parseable pickle: it is corrupt, not unsafe
        return False


def _first_reason(text: str) -> str:
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported" in line or "Unpickler" in line:
            return line.strip()
    return text.strip().splitlines()[0][:200] if text.strip() else "unknown reason"


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


def load_stream(fileobj: IO[bytes], name: str = "", size: Optional[int] = None,
                map_location: MapLocation = None, trust_pickle: bool = False) -> Any:
    """Load a checkpoint from an open binary stream, picking the format from its bytes.

    safetensors files written by :func:`write_safetensors` with a skeleton come
    back as the original nested dict; other safetensors files as a flat dict of tensors.

    Raises:
        UnsafeCheckpointError, CorruptCheckpointError: see :func:`load_torch`.
    """
    seekable = getattr(fileobj, "seekable", lambda: False)()
    if not seekable:
        fileobj = io.BytesIO(fileobj.read())
    start = fileobj.tell()
    head = fileobj.read(16)
    fileobj.seek(start)
    kind = sniff_format(head, name)
    if kind == "safetensors":
        tensors, metadata = read_safetensors(fileobj, size, map_location)
        if SKELETON_KEY in metadata:
            try:
                skeleton = json.loads(metadata[SKELETON_KEY])
            except json.JSONDecodeError as exc:
                raise CorruptCheckpointError(f"{name or 'file'}: structure metadata is not JSON") from exc
            return from_skeleton(skeleton, tensors)
        return tensors
    if kind == "unknown" and not head:
        raise CorruptCheckpointError(f"{name or 'checkpoint'} is empty (0 bytes)")
    return load_torch(fileobj, map_location, trust_pickle, source=name or "checkpoint")
