"""A streaming reader and writer of the safetensors format, tensor by tensor, over any file object.

We read and write safetensors with our own small code instead of the
``safetensors`` package's ``save_file``/``load``: that package turns every
tensor into a Python ``bytes`` copy before writing and needs either a local
path (mmap) or the whole file in memory to read, while checkpoints go to and
come from fsspec file objects and should stream, reading straight into
existing parameters. The format is the published one (8-byte little-endian
header length, JSON header, raw little-endian data); files written here load
with ``safetensors.torch.load_file`` and vice versa (tested).
"""
from __future__ import annotations

import bisect
import json
import math
import struct
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple

import torch

from ..errors import CorruptCheckpointError, UnserializableStateError
from .maplocation import MapLocation, map_tensor
from .pieces import fill_exact

__all__ = ["SAFETENSORS_DTYPES", "MAX_HEADER_BYTES", "write_safetensors", "read_safetensors_header",
           "read_safetensors", "tensor_bytes", "stand_ins"]

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
READ_GROUP = 256 * 1024 * 1024  # tensors read at once (then moved to map_location), at least one


class BinaryWriter(Protocol):
    """What the writer needs of a file: ``write`` (a real file, or a hashing wrapper around one)."""

    def write(self, data: Any, /) -> Any:
        """Write bytes-like ``data``."""


class BinaryReader(Protocol):
    """What the reader needs of a file: ``read`` (``readinto``, and ``fill`` of a HashingReader, used when present)."""

    def read(self, n: int = -1, /) -> bytes:
        """Read up to ``n`` bytes."""



def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy (for contiguous CPU tensors) byte view of ``tensor``."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    data: Any = flat.view(torch.uint8).numpy()  # a numpy array exports the buffer protocol
    return memoryview(data)


def write_safetensors(fileobj: BinaryWriter, tensors: Mapping[str, torch.Tensor],
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
        fileobj.write(tensor_bytes(tensor))
    return 8 + len(raw) + offset


def read_safetensors_header(fileobj: BinaryReader, size: Optional[int] = None) -> Tuple[Dict[str, Any], int]:
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


def stand_ins(header: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    """Data-less stand-ins (``device='meta'``: shape and dtype only) for the tensors of a validated header.

    They let a reader check what a file holds against live objects before a
    single byte of tensor data is read.
    """
    return OrderedDict((name, torch.empty([int(d) for d in entry["shape"]], dtype=_DTYPE_FROM_CODE[entry["dtype"]],
                                          device="meta"))
                       for name, entry in header.items() if name != "__metadata__")


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


def read_safetensors(fileobj: BinaryReader, size: Optional[int] = None, map_location: MapLocation = None,
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
    group: List[Tuple[str, memoryview]] = []
    grouped = 0  # bytes in group
    taken = _Spans()

    fill = getattr(fileobj, "fill", None)  # a HashingReader's: large local files are read on several threads

    def read_group() -> None:
        if fill is not None:
            fill(group)
        else:
            for name, view in group:
                fill_exact(fileobj, view, name)
        for name, _ in group:  # moved (map_location) group by group: a GPU restore holds one group in host memory
            out[name] = map_tensor(out[name], map_location)
        group.clear()
    for name, entry in entries:
        dtype = _DTYPE_FROM_CODE[entry["dtype"]]
        shape = tuple(entry["shape"])
        target = (into or {}).get(name)
        if not (isinstance(target, torch.Tensor) and target.device.type == "cpu" and target.dtype == dtype
                and tuple(target.shape) == shape and target.is_contiguous() and taken.claim(target)):
            # tied weights (two names, one tensor) are read once in place and once into a copy: bytes
            # landing twice in one place, on two threads, could hide a damaged copy from the checksum
            target = torch.empty(shape, dtype=dtype)
        out[name] = target
        group.append((name, tensor_bytes(target.detach()).cast("B")))
        grouped += len(group[-1][1])
        if grouped >= READ_GROUP:
            read_group()
            grouped = 0
    read_group()
    return out, metadata


class _Spans:
    """The memory ranges of the tensors a read fills in place, to keep any byte from being filled twice."""

    def __init__(self) -> None:
        self._starts: List[int] = []
        self._ends: List[int] = []

    def claim(self, tensor: torch.Tensor) -> bool:
        """Take ``tensor``'s bytes; False (nothing taken) when they overlap bytes already taken."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if end == start:
            return True
        at = bisect.bisect_right(self._starts, start)
        if (at and self._ends[at - 1] > start) or (at < len(self._starts) and self._starts[at] < end):
            return False
        self._starts.insert(at, start)
        self._ends.insert(at, end)
        return True
