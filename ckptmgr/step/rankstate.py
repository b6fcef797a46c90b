"""Per-rank state: every rank saves its own and gets exactly its own back.

A data loader's position, a streaming dataset's shard offset or a per-rank
curriculum counter differ on every data-parallel rank. Saving them from rank
0 only would resume every rank at rank 0's position: silently wrong data
order. ``rank_state=`` (a dict name -> stateful object, JSON-like value or
tensors, or a callable returning one; or a callable returning such a dict) is
therefore written by every rank into its own file
(``rank_state-rank00001.json`` or ``.safetensors``, no pickle), listed in
the manifest under ``components['rank_state']`` like the RNG files, and read
back on restore by the same rank.

Rank state cannot be resharded generically, so a restore with another number
of ranks raises :class:`~ckptmgr.errors.WorldSizeChangedError` before
anything is read, unless the caller passes ``on_world_size_change='skip'``:
then everything else is restored, rank state is left as it is and one
warning names what was skipped. (RNG files keep their own rule: a rank with a
saved file gets its streams back, others keep theirs with a warning.)
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

from ..errors import CheckpointFormatError, WorldSizeChangedError
from ..format.manifest import Manifest, verify_file
from ..format.maplocation import MapLocation
from ..format.skeleton import to_skeleton
from ..io.store import Store
from ..state.objects import plain, stateful
from .files import read_component

logger = logging.getLogger(__name__)

__all__ = ["POLICIES", "check_policy", "base_name", "collect", "manifest_table", "file_for", "usable", "read",
           "apply"]

#: Values of ``restore(on_world_size_change=...)``.
POLICIES = ("error", "skip")


def check_policy(value: Any) -> str:
    """Validate ``on_world_size_change``.

    Raises:
        ValueError: not ``'error'`` or ``'skip'``.
    """
    if isinstance(value, str) and value in POLICIES:
        return value
    raise ValueError(f"on_world_size_change must be 'error' or 'skip', got {value!r}")


def base_name(rank: int) -> str:
    """The file name (without extension) of ``rank``'s rank state."""
    return f"rank_state-rank{rank:05d}"


def _resolve(rank_state: Any) -> Optional[Mapping[str, Any]]:
    """The dict behind ``rank_state`` (a callable is called).

    Raises:
        TypeError: it is not a dict with str keys (or a callable returning one).
    """
    if rank_state is None:
        return None
    if callable(rank_state) and not isinstance(rank_state, Mapping) and not stateful(rank_state):
        rank_state = rank_state()
    if not isinstance(rank_state, Mapping) or not all(isinstance(k, str) for k in rank_state):
        raise TypeError(f"rank_state must be a dict with str keys (or a callable returning one), got "
                        f"{type(rank_state).__name__}")
    return rank_state


def collect(rank_state: Any) -> Optional[Dict[str, Any]]:
    """This rank's state as a tree to store: stateful objects as their ``state_dict()``, callables evaluated now.

    Raises:
        TypeError: ``rank_state`` is not a dict with str keys.
        UnserializableStateError: a value cannot be stored without pickle.
    """
    resolved = _resolve(rank_state)
    if resolved is None:
        return None
    out: Dict[str, Any] = {}
    for key, value in resolved.items():
        if stateful(value):
            out[key] = {"kind": "stateful", "value": value.state_dict()}
            continue
        if callable(value):
            value = value()
        to_skeleton(value, path=f"rank_state.{key}")  # fail now, with the key in the message
        out[key] = {"kind": "value", "value": value}
    return out


def manifest_table(names: Mapping[int, Optional[str]]) -> Dict[str, str]:
    """``{rank: file}`` for the ranks that wrote rank state."""
    return {str(rank): name for rank, name in sorted(names.items()) if name}


def file_for(manifest: Manifest, rank: int) -> Optional[str]:
    """The rank-state file ``rank`` wrote, or None."""
    table = manifest.components.get("rank_state")
    name = table.get(str(rank)) if isinstance(table, dict) else None
    return name if isinstance(name, str) else None


def usable(manifest: Manifest, world: int, policy: str) -> bool:
    """Whether this job may restore the step's rank state (False: skip it).

    Raises:
        WorldSizeChangedError: the step holds rank state of another world size and ``policy`` is ``'error'``.
    """
    table = manifest.components.get("rank_state")
    if not table or manifest.world_size == world:
        return True
    if policy == "skip":
        return False
    raise WorldSizeChangedError(f"step {manifest.step} holds per-rank state (rank_state) saved by "
                                f"{manifest.world_size} rank(s), but this job has {world}")


def read(store: Store, manifest: Manifest, rank: int, verify: bool, map_location: MapLocation,
         check_all: bool) -> Optional[Dict[str, Any]]:
    """Read ``rank``'s rank state (None when it saved none); with ``check_all`` verify every rank's file.

    Raises:
        ChecksumError, CorruptCheckpointError: a file differs from the manifest.
    """
    name = file_for(manifest, rank)
    if check_all and verify:
        for other in range(manifest.world_size):
            other_name = file_for(manifest, other)
            if other != rank and other_name is not None:
                verify_file(store, other_name, manifest.files[other_name], manifest.checksum)
    return None if name is None else read_component(store, manifest, name, verify, map_location)


def apply(rank_state: Any, saved: Optional[Mapping[str, Any]], skipped: bool, manifest: Manifest,
          strict: bool) -> Dict[str, Any]:
    """Load this rank's saved state into the objects of ``rank_state``; returns the restored values.

    Objects with ``load_state_dict`` are loaded and returned as themselves;
    other saved values are returned as saved.

    Raises:
        CheckpointFormatError: ``strict`` and an object passed has no saved state.
    """
    targets = _resolve(rank_state) or {}
    if skipped:
        table = manifest.components.get("rank_state") or {}
        logger.warning("step %d was saved by %d rank(s), this job has a different number: skipped rank_state "
                       "%s (the files of ranks %s), left as it is", manifest.step, manifest.world_size,
                       sorted(targets) or "(none passed)", ", ".join(sorted(table, key=int)))
        return {}
    out: Dict[str, Any] = {}
    for key, entry in (saved or {}).items():
        target = targets.get(key)
        if entry.get("kind") == "stateful" and target is not None and stateful(target):
            target.load_state_dict(entry["value"])
            out[key] = target
        else:
            out[key] = plain(entry.get("value"))
    missing = sorted(k for k in targets if k not in out)
    if missing and strict:
        raise CheckpointFormatError(f"the checkpoint holds no rank_state {missing} for this rank "
                                    f"(it has {sorted(out)})", "pass the names given to save(), or strict=False")
    if missing:
        logger.warning("the checkpoint holds no rank_state %s for this rank; left as they are", missing)
    return out

