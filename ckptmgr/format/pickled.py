"""Reading the weights of a torch file whose other parts need pickle, without running any of it.

An mmengine Runner checkpoint holds, next to its weights, a ``message_hub``
of ``HistoryBuffer`` objects and numpy scalars; an mmcv 1.x runner keeps a
numpy ``best_score`` in ``meta``. ``torch.load(weights_only=True)`` refuses the
whole file for them. When a caller wants only the weights
(``load_checkpoint(model, path)``), :func:`load_skipping_pickled` loads it with
torch's own restricted unpickler, allowing each refused global *name* as an
inert stand-in class of ours (:class:`SkippedObject`): constructing one, or
setting its state, stores nothing and calls nothing, so no code named in the
file runs. Globals from modules torch blocks outright (``os``, ``sys``, ...)
are still refused. Then every dict entry that holds a stand-in is removed (the
smallest entries: ``meta['hook_msgs']['best_score']``, not all of ``meta``),
one warning names them, and a state dict that holds one is refused.

torch keeps its allowed globals in one process-wide set, so a stand-in session
holds a lock and registers exact names only. ckptmgr's other weights-only loads
check their result for stand-ins whenever a session overlapped them
(:func:`check_no_stand_ins`); a plain ``torch.load`` in another thread of the
same process, during a session, could at worst return an inert stand-in where
it would have raised.

The switch is a context variable (:func:`skip_pickled`), set by the functions
that need weights only, so it reaches the format layer through any loader
(local, fsspec, http, zoo) without changing their signatures.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from typing import IO, Any, Callable, Iterator, List, Mapping, Tuple, Union

import torch

from ..errors import UnsafeCheckpointError
from .maplocation import MapLocation

logger = logging.getLogger(__name__)

__all__ = ["SkippedObject", "skip_pickled", "skipping_pickled", "load_skipping_pickled", "check_no_stand_ins",
           "session_marker"]

_SKIP: contextvars.ContextVar[bool] = contextvars.ContextVar("ckptmgr_skip_pickled", default=False)
_SESSION_LOCK = threading.Lock()
_state = {"generation": 0, "active": 0}
_WEIGHT_KEYS = ("state_dict", "model")
_MAX_DEPTH = 64


class SkippedObject:
    """What an object that needs pickle becomes: it takes any arguments and state, and keeps none."""

    __slots__ = ()
    skipped_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "SkippedObject":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.skipped_name}>"


def _stand_in(name: str) -> type:
    return type("Skipped_" + name.replace(".", "_"), (SkippedObject,), {"__slots__": (), "skipped_name": name})


@contextlib.contextmanager
def skip_pickled() -> Iterator[None]:
    """Within this block, torch files whose non-weight parts need pickle load with those parts removed."""
    token = _SKIP.set(True)
    try:
        yield
    finally:
        _SKIP.reset(token)


def skipping_pickled() -> bool:
    """True inside :func:`skip_pickled`."""
    return _SKIP.get()


def session_marker() -> int:
    """A number that changes whenever a stand-in session starts or ends (see :func:`check_no_stand_ins`)."""
    return _state["generation"]


def _holds(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, SkippedObject):
        return True
    if depth > _MAX_DEPTH:
        return False
    if isinstance(obj, Mapping):  # a state dict's module versions (_metadata) count too
        return (_holds(getattr(obj, "_metadata", None), depth + 1)
                or any(_holds(k, depth + 1) or _holds(v, depth + 1) for k, v in obj.items()))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds(v, depth + 1) for v in obj)
    return False


def check_no_stand_ins(obj: Any, marker: int, source: str) -> None:
    """Refuse a weights-only load result if a stand-in session overlapped it and it holds a stand-in.

    Args:
        obj: What ``torch.load(weights_only=True)`` returned.
        marker: :func:`session_marker` taken before the load.
        source: The file's name, for the message.

    Raises:
        UnsafeCheckpointError: the result holds a stand-in.
    """
    if (marker != _state["generation"] or _state["active"]) and _holds(obj):
        raise UnsafeCheckpointError(f"{source} needs arbitrary pickle code to load")


def _prune(obj: Any, path: str, removed: List[str], depth: int = 0) -> None:
    """Delete, in place, the smallest dict entries holding a stand-in; record their dotted paths."""
    if not isinstance(obj, dict) or depth > _MAX_DEPTH:
        return
    for key in list(obj):
        here = f"{path}.{key}" if path else str(key)
        value = obj[key]
        if isinstance(value, dict) and not _holds(key) and not _holds(getattr(value, "_metadata", None)):
            _prune(value, here, removed, depth + 1)
        elif _holds(key) or _holds(value):
            del obj[key]
            removed.append(here)


def _weights_of(checkpoint: Mapping[str, Any]) -> Any:
    for key in _WEIGHT_KEYS:
        if key in checkpoint:
            return checkpoint[key]
    return checkpoint


def load_skipping_pickled(fileobj: IO[bytes], start: int, map_location: MapLocation, source: str) -> Any:
    """Load a torch zip file with every part that needs pickle removed (see the module docstring).

    Args:
        fileobj: The seekable file.
        start: Its start offset.
        map_location: As for ``torch.load``.
        source: Its name, for messages.

    Returns:
        The checkpoint dict without the entries that need pickle.

    Raises:
        UnsafeCheckpointError: the weights themselves need pickle, a global comes from a
            module torch blocks, or the file is not a torch zip file.
    """
    with _SESSION_LOCK:
        try:
            fileobj.seek(start)
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(fileobj))
        except (ValueError, RuntimeError, OSError) as exc:
            raise UnsafeCheckpointError(f"{source} needs arbitrary pickle code to load "
                                        f"(and is not a zip torch file whose weights can be read alone: {exc})"
                                        ) from exc
        entries: List[Union[Callable[..., Any], Tuple[Callable[..., Any], str]]] = [
            (_stand_in(name), name) for name in names]
        _state["generation"] += 1
        _state["active"] += 1
        try:
            fileobj.seek(start)
            with torch.serialization.safe_globals(entries):
                checkpoint = torch.load(fileobj, map_location=map_location, weights_only=True)
        except Exception as exc:  # a blocked module (os, sys, ...) or a construct torch refuses: refuse too
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UnsafeCheckpointError(f"{source} needs arbitrary pickle code to load ({reason})") from exc
        finally:
            _state["active"] -= 1
            _state["generation"] += 1
    return _without_stand_ins(checkpoint, names, source)


def _without_stand_ins(checkpoint: Any, names: List[str], source: str) -> Any:
    needs = ", ".join(names)
    if not isinstance(checkpoint, dict) or _holds(_weights_of(checkpoint)):
        raise UnsafeCheckpointError(f"{source}: the model weights themselves need pickle code to load ({needs})")
    removed: List[str] = []
    _prune(checkpoint, "", removed)
    if removed:
        logger.warning("%s: skipped %s (loading them needs pickle code: %s); the weights are loaded. Pass "
                       "trust_pickle=True for a file you trust to load everything", source, ", ".join(removed),
                       needs)
    return checkpoint

