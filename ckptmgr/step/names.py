"""Names inside a manager directory: what the manager may create, recognise and delete.

A step lives in ``step_00000100`` (at least 8 digits). A local save writes
under ``.tmp-step_00000100-<uuid>`` and renames it into place; a forced
replace without an atomic swap parks the old copy under
``.old-step_00000100-<uuid>`` for an instant. Nothing else in a directory is
ever touched: the patterns here are exact, so ``step_000000100`` or a user's
``.tmp-notes`` are not ours.
"""
from __future__ import annotations

import re
import uuid
from typing import Optional

__all__ = ["step_name", "parse_step_name", "temp_name", "is_temp_name", "old_name", "parse_old_name",
           "leftover_step"]

_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TEMP_RE = re.compile(r"^\.tmp-step_\d{8,}-[0-9a-f]{32}$")
_OLD_RE = re.compile(r"^\.old-(step_\d{8,})-[0-9a-f]{32}$")
_LEFTOVER_RE = re.compile(r"^\.(?:tmp|old)-step_(\d{8,})-[0-9a-f]{32}$")


def step_name(step: int) -> str:
    """Directory name of ``step``: ``step_00000100`` (at least 8 digits)."""
    return f"step_{int(step):08d}"


def parse_step_name(name: str) -> Optional[int]:
    """The step of a checkpoint directory name, or None when the name is not exactly ours."""
    match = _STEP_RE.match(name)
    if not match:
        return None
    step = int(match.group(1))
    return step if step_name(step) == name else None  # 'step_000000100' is not ours


def temp_name(step: int) -> str:
    """A fresh temporary directory name for writing ``step`` (same parent as the final one)."""
    return f".tmp-{step_name(step)}-{uuid.uuid4().hex}"


def is_temp_name(name: str) -> bool:
    """True for names :func:`temp_name` makes (and only those)."""
    return bool(_TEMP_RE.match(name))


def old_name(step: int) -> str:
    """Where a replaced local checkpoint waits while a forced save swaps without renameat2."""
    return f".old-{step_name(step)}-{uuid.uuid4().hex}"


def parse_old_name(name: str) -> Optional[str]:
    """The step directory an :func:`old_name` directory belongs to, or None."""
    match = _OLD_RE.match(name)
    return match.group(1) if match else None


def leftover_step(name: str) -> Optional[int]:
    """The step of a temporary or replaced directory name (a save's leftovers), or None."""
    match = _LEFTOVER_RE.match(name)
    return int(match.group(1)) if match else None
