"""DCP's metadata file read with an allowlist unpickler: no byte of it can run code.

torch.distributed.checkpoint stores its metadata (``dcp.metadata`` here) as a
pickle and loads it with the standard unpickler. A manifest only proves that
the bytes are the ones the manifest lists; whoever can write the step
directory can write both. So the metadata is unpickled here with an
unpickler whose :meth:`~pickle.Unpickler.find_class` answers only exact
``(module, name)`` pairs that DCP really writes: its metadata dataclasses,
``_StorageInfo``, ``torch.Size``, the dtypes and the layout lookup. Every way a
pickle can name code (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT1/2/4) goes through
``find_class``, so anything else is refused before it is imported.

Why not torch's own ``weights_only`` unpickler: it implements the protocol-2
opcodes only, and DCP writes protocol 4 (FRAME, MEMOIZE, STACK_GLOBAL), so it
cannot read real DCP metadata even with every class allowed.

Names are matched exactly: no module prefixes (``module.os.system`` resolves
by attribute inside an allowed module) and no dotted names. ``pathlib``
paths (``StorageMeta.checkpoint_id`` when DCP saved to a local path) become
their *pure* counterparts, which compare equal and touch no filesystem.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Dict, Optional, Tuple

from ..errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["allowed_globals", "load_metadata", "UNSAFE_HINT"]

UNSAFE_HINT = ("ckptmgr reads DCP metadata only with its allowlist, whatever the manifest says: this step was "
               "altered or written by other code; restore another step, or re-save it from a trusted source")

_METADATA_CLASSES = ("Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING")
_ALLOWED: Optional[Dict[Tuple[str, str], Any]] = None


def allowed_globals() -> Dict[Tuple[str, str], Any]:
    """The ``(module, name) -> object`` pairs DCP metadata may reference (built once)."""
    global _ALLOWED
    if _ALLOWED is None:
        import pathlib

        import torch
        import torch.serialization
        from torch.distributed.checkpoint import filesystem, metadata
        table: Dict[Tuple[str, str], Any] = {
            ("torch.distributed.checkpoint.metadata", name): getattr(metadata, name) for name in _METADATA_CLASSES}
        table[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
        table[("torch", "Size")] = torch.Size
        table[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # copyreg's torch.layout
        for name, value in vars(torch).items():  # a dtype pickles as the global ('torch', 'float32')
            if isinstance(value, torch.dtype):
                table[("torch", name)] = value
        table[("pathlib", "PosixPath")] = pathlib.PurePosixPath
        table[("pathlib", "WindowsPath")] = pathlib.PureWindowsPath
        _ALLOWED = table
    return _ALLOWED


class _Refused(pickle.UnpicklingError):
    """Raised inside the unpickler; :func:`load_metadata` turns it into UnsafeCheckpointError."""


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return allowed_globals()[(module, name)]
        except KeyError:
            raise _Refused(f"it references {module}.{name}, which DCP metadata never holds") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it holds a persistent id, which DCP metadata never does")


def load_metadata(data: bytes, source: str) -> Any:
    """Unpickle DCP metadata bytes with the allowlist; the result is a ``Metadata``.

    Args:
        data: The file's bytes (already checked against the manifest).
        source: Where they came from, for messages.

    Returns:
        The ``torch.distributed.checkpoint.metadata.Metadata``.

    Raises:
        UnsafeCheckpointError: the pickle names anything outside the allowlist
            (nothing of it was imported or called).
        CorruptCheckpointError: it is not a well-formed pickle of DCP metadata.
    """
    from torch.distributed.checkpoint.metadata import Metadata
    try:
        value = _AllowlistUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise UnsafeCheckpointError(f"{source}: refusing to load DCP metadata: {exc}", UNSAFE_HINT) from None
    except Exception as exc:  # truncated or garbled: pickle raises many kinds (EOFError, KeyError, ...)
        raise CorruptCheckpointError(f"{source}: DCP metadata is not a readable pickle "
                                     f"({type(exc).__name__}: {exc})") from None
    if not isinstance(value, Metadata):
        raise CorruptCheckpointError(f"{source}: DCP metadata holds a {type(value).__name__}, not DCP metadata")
    return value
