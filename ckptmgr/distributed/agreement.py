"""Turning one rank's exception into an error on every rank.

A distributed save or restore is a sequence of phases; if any rank fails in a
phase, every rank must stop there (a rank that carried on would wait forever
in the next collective, and a manifest must never be written for a partial
checkpoint). :func:`agree` runs one phase everywhere and exchanges the
outcome through :func:`ckptmgr.distributed.all_gather_json`, which has a deadline.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from .. import errors
from ..errors import CheckpointError, DistributedError
from . import collectives as dist

__all__ = ["agree"]


def _describe(exc: BaseException) -> Dict[str, Any]:
    return {"type": type(exc).__name__, "message": getattr(exc, "message", str(exc)),
            "hint": getattr(exc, "hint", None), "typed": isinstance(exc, CheckpointError)}


def _rebuild(desc: Mapping[str, Any], rank: int, what: str) -> CheckpointError:
    """The error a rank raises for a failure that happened on another rank."""
    cls = getattr(errors, desc["type"], None) if desc.get("typed") else None
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        return cls(f"{what} failed on rank {rank}: {desc['message']}", desc.get("hint"))
    return DistributedError(f"{what} failed on rank {rank}: {desc['type']}: {desc['message']}")


def agree(what: str, func: Callable[[], Any], group: Optional[Any] = None) -> List[Any]:
    """Run ``func`` on every rank; return every rank's (JSON) result, or raise on every rank.

    The rank whose ``func`` raised re-raises its own exception; the others raise
    the same :mod:`ckptmgr.errors` type, or DistributedError, naming that rank.
    Outside torch.distributed this is just ``[func()]``.

    Args:
        what: Names the phase in messages (``"saving step 7 to DIR (write)"``).
        func: The phase; its return value must be JSON-serialisable.
        group: Process group for the exchange (a background writer passes its
            private group); None for ckptmgr's default control group.

    Raises:
        DistributedError: another rank failed, or did not answer within the
            timeout of :func:`ckptmgr.distributed.default_timeout`.
    """
    error: Optional[BaseException] = None
    result = None
    try:
        result = func()
    except Exception as exc:  # becomes an error on every rank below
        error = exc
    try:
        replies = dist.all_gather_json({"error": _describe(error) if error else None, "result": result}, what=what,
                                       group=group)
    except DistributedError as exchange_failed:
        if error is not None:
            raise error from exchange_failed
        raise
    for rank, reply in enumerate(replies):
        if reply["error"] is not None:
            if error is not None:
                raise error
            raise _rebuild(reply["error"], rank, what)
    return [reply["result"] for reply in replies]
