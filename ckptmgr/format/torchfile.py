"""``torch.save`` files: written as they are, read with ``weights_only=True`` unless the caller trusts them.

Full unpickling happens only with ``trust_pickle=True``; a pickle that needs
code is told apart from a damaged file without running it (``pickletools``
parses opcodes, it never executes them). Inside :func:`~.pickled.skip_pickled`
a file whose non-weight parts need pickle loads without them (:mod:`.pickled`).
"""
from __future__ import annotations

import errno
import pickle
import re
import struct
from typing import IO, Any, Optional

import torch

from ..errors import CheckpointFormatError, CorruptCheckpointError, UnsafeCheckpointError
from .maplocation import MapLocation
from .pickled import check_no_stand_ins, load_skipping_pickled, session_marker, skipping_pickled

__all__ = ["save_torch", "load_torch"]


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
    if start is not None:
        head = fileobj.read(4)
        fileobj.seek(start)
        if head and not _looks_like_torch(head):
            raise CorruptCheckpointError(
                f"{source} is not a checkpoint: it is neither a torch file (zip or pickle) nor safetensors "
                f"(it starts with {head!r})",
                "pass a .pth/.pt/.safetensors checkpoint or a manager directory; if this file was one, it is damaged")
    try:
        if trust_pickle:  # explicit opt-in by the caller: the only full unpickling in ckptmgr
            try:
                return torch.load(fileobj, map_location=map_location, weights_only=False)  # trust_pickle=True
            except (AttributeError, ImportError) as exc:
                missing = _missing_code(exc, source)
                if missing is None:
                    raise
                raise missing from exc
        marker = session_marker()
        result = torch.load(fileobj, map_location=map_location, weights_only=True)
        check_no_stand_ins(result, marker, source)
        return result
    except CheckpointFormatError:
        raise
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "global" in text or _plain_pickle_needing_code(fileobj, start):
            if skipping_pickled() and start is not None:
                return load_skipping_pickled(fileobj, start, map_location, source)
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


def _looks_like_torch(head: bytes) -> bool:
    """A zip archive (torch >= 1.6), a pickle with a protocol header (the legacy format), or a bare pickle."""
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"


_MISSING_ATTR = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def _missing_code(exc: BaseException, source: str) -> Optional[CheckpointFormatError]:
    """A trusted pickle that names a class or module this process cannot import: say so (it is not damaged)."""
    match = _MISSING_ATTR.search(str(exc))
    if match:
        name, module = match.groups()
        module = "__main__" if module.endswith("__main__") else module  # `python -m pkg` names its __main__ so
        where = "the script that saved it (its __main__)" if module == "__main__" else f"module {module}"
        return CheckpointFormatError(
            f"{source} holds a pickled {name}, a class defined in {where}, which is not importable here",
            f"import or define {name} {'in your __main__ ' if module == '__main__' else ''}before loading; better, "
            "save model.state_dict() instead of the whole model")
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return CheckpointFormatError(f"{source} holds pickled objects from module {exc.name}, which is not "
                                     "installed here", f"install {exc.name} (or put it on PYTHONPATH) to load it")
    return None


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
