"""The mmengine side of ckptmgr steps: mmengine state as plain trees, the ``ckptmgr:`` loader, ``load_from`` schemes.

Used by :mod:`ckptmgr.integrations.mmengine` (import that one); kept apart so
each module stays small. Importing it imports mmengine, or raises
:class:`~ckptmgr.errors.MissingDependencyError` with an install hint.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Tuple

from ..distributed import get_rank
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, MissingDependencyError
from ..format.maplocation import MapLocation
from ..inventory import check_step
from ..io.access import open_store
from ..io.store import Store
from ..loaders.registry import CheckpointLoader
from ..step.formats import Formats
from ..step.index import StepIndex
from ..step.load import newest_good, read_step
from ..step.names import parse_step_name, step_name

try:
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader as MMCheckpointLoader
except ImportError as _exc:
    raise MissingDependencyError("ckptmgr.integrations.mmengine needs mmengine, which is not installed",
                                 "pip install 'ckptmgr[mmengine]'") from _exc

__all__ = ["SCHEME", "encode", "decode", "newest_verified", "load_from_ckptmgr", "register_loaders"]

SCHEME = "ckptmgr:"
_BUFFER, _COUNTER = "__historybuffer__", "__counter__"


# --------------------------------------------------------------------------- mmengine state <-> plain trees


def encode(obj: Any) -> Any:
    """Tag the two mmengine types JSON plus tensors cannot hold: HistoryBuffer and Counter (milestones)."""
    if isinstance(obj, HistoryBuffer):
        log_history, count_history = obj.data
        return {_BUFFER: {"max_length": obj.max_length, "log_history": log_history, "count_history": count_history}}
    if isinstance(obj, Counter):
        return {_COUNTER: [[encode(k), v] for k, v in obj.items()]}
    if isinstance(obj, Mapping):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [encode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(encode(v) for v in obj)
    return obj


def decode(obj: Any) -> Any:
    """Undo :func:`encode`."""
    if isinstance(obj, Mapping):
        if len(obj) == 1 and _BUFFER in obj:
            b = obj[_BUFFER]
            return HistoryBuffer(b["log_history"], b["count_history"], b["max_length"])
        if len(obj) == 1 and _COUNTER in obj:
            return Counter({decode(k): v for k, v in obj[_COUNTER]})
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(decode(v) for v in obj)
    return obj


# --------------------------------------------------------------------------- the loader


def _step_of(uri: str) -> Tuple[str, int]:
    """``(manager directory, step)`` for a step directory or a manager directory (its newest good step)."""
    trimmed = uri.rstrip("/") or uri
    parent, _, name = trimmed.rpartition("/")
    step = parse_step_name(name)
    if step is not None:
        return parent, step
    found = newest_verified(open_store(trimmed))
    if found is None:
        raise CheckpointNotFoundError(f"{uri} holds no committed checkpoint")
    return trimmed, found


def _verified(store: Store, step: int) -> int:
    result = check_step(store.sub(step_name(step)))
    if not result.ok:
        raise CorruptCheckpointError(f"{result.uri}: " + "; ".join(result.problems))
    return step


def newest_verified(store: Store) -> Any:
    """The newest step of a manager directory whose every file checks out, or None (damaged newer ones skipped)."""
    found = newest_good(list(StepIndex(store).refresh()), lambda s: _verified(store, s), store.root)
    return None if found is None else found[0]


def load_from_ckptmgr(filename: str, map_location: MapLocation = None) -> Dict[str, Any]:
    """mmengine loader for ``ckptmgr:<step or manager directory>``: the dict ``Runner.resume`` expects.

    Every file read is checked against the manifest; nothing is unpickled.

    Raises:
        CheckpointNotFoundError, ChecksumError, CorruptCheckpointError: as for a manager restore.
    """
    directory, step = _step_of(filename[len(SCHEME):] if filename.startswith(SCHEME) else filename)
    if map_location == "default":
        map_location = None
    _, loaded = read_step(open_store(directory), step, get_rank(), Formats(False), verify=True,
                          map_location=map_location)
    extra = (loaded.get("extra") or {}).get("mmengine") or {}
    checkpoint = decode(extra.get("value") or {})
    weights: Any
    weights, module_meta = loaded.model.states["model"] if loaded.model is not None else ({}, {})
    if module_meta:
        weights._metadata = module_meta
    checkpoint["state_dict"] = weights
    for key, component in (("optimizer", "optimizer"), ("param_schedulers", "scheduler")):
        saved = loaded.get(component)
        if saved is not None:
            checkpoint[key] = decode(saved["states"][component])
    checkpoint["ckptmgr"] = {"step": step, "rng": loaded.rng}
    return checkpoint


# --------------------------------------------------------------------------- load_from schemes


def _bridge(trust_pickle: bool) -> Callable[[str, Any], Any]:
    def load_from_ckptmgr_registry(filename: str, map_location: Any = None) -> Any:
        return CheckpointLoader.load_checkpoint(filename, map_location=map_location, trust_pickle=trust_pickle)
    return load_from_ckptmgr_registry


def _fsspec_protocols(covered: List[str]) -> List[str]:
    from fsspec.registry import known_implementations
    local = {"file", "local", "memory"} | {p.split("://")[0] for p in covered}
    return sorted(p for p in known_implementations if p not in local and re.fullmatch(r"[a-z][a-z0-9+.-]*", p))


def register_loaders(*, trust_pickle: bool = False, replace_builtins: bool = True) -> None:
    """Route mmengine's ``load_from`` and ``CheckpointLoader`` through ckptmgr's loaders.

    Registers ``ckptmgr:`` (manager steps, see :func:`load_from_ckptmgr`), every
    prefix in ckptmgr's scheme registry (``s3://``, ``http(s)://``,
    ``torchvision://``, ``open-mmlab://``, ... and schemes you registered
    there before this call) and every other fsspec protocol (``gs://``, ...).
    mmengine's own ``http(s)://`` and zoo loaders are replaced too, unless
    ``replace_builtins=False``; ``pavi://`` and ``open-mmlab:s3://`` (petrel)
    keep theirs. Calling it again is harmless.

    Args:
        trust_pickle: Let files that need arbitrary pickle load (only sources you trust).
        replace_builtins: Replace the loaders mmengine registered for the same schemes.
    """
    table = MMCheckpointLoader._schemes

    def register(prefix: str, loader: Callable[..., Any]) -> None:
        existing = table.get(prefix)
        if existing is not None and getattr(existing, "__module__", None) != __name__ and not replace_builtins:
            return
        MMCheckpointLoader.register_scheme(prefix, loader, force=existing is not None)

    register(re.escape(SCHEME), load_from_ckptmgr)
    bridge = _bridge(trust_pickle)
    local = ("", "file://")  # local paths stay mmengine's: its own checkpoints need its pickle
    prefixes = [p for p in CheckpointLoader.registered_schemes() if isinstance(p, str) and p not in local]
    for prefix in prefixes:
        register(prefix if prefix in table else re.escape(prefix), bridge)
    others = _fsspec_protocols(prefixes)
    if others:
        register("(?:" + "|".join(re.escape(p) for p in others) + ")://", bridge)


# The hook's resume path needs ``ckptmgr:`` whether or not register_loaders() is called; it is a new key.
MMCheckpointLoader.register_scheme(re.escape(SCHEME), load_from_ckptmgr, force=True)
