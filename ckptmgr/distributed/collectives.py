"""Rank and world information, and the few collectives ckptmgr needs.

Everything here is a no-op (or the obvious single-process answer) when
``torch.distributed`` is not initialised, so library code can call it
unconditionally. Every collective has a deadline: a rank that died or raised
turns into a :class:`~ckptmgr.errors.DistributedError` on the others instead of
a hang. Payloads travel as JSON, never pickle.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist

from ..errors import DistributedError

logger = logging.getLogger(__name__)

__all__ = [
    "is_distributed", "get_rank", "get_world_size", "get_local_rank",
    "is_rank_zero", "default_timeout", "barrier", "all_agree",
    "broadcast_json", "all_gather_json", "rank_zero_first", "new_control_group",
]

_CONTROL_GROUPS: dict = {}


def is_distributed() -> bool:
    """Return True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 outside torch.distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """World size, 1 outside torch.distributed."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank within this node (``LOCAL_RANK`` from torchrun/accelerate, else the global rank)."""
    if not is_distributed():
        return 0
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None and value.isdigit() else get_rank()


def is_rank_zero(local: bool = False) -> bool:
    """True on global rank 0 (or on each node's local rank 0 when ``local``)."""
    return (get_local_rank() if local else get_rank()) == 0


def default_timeout() -> float:
    """Seconds a collective may wait for the other ranks (``CKPTMGR_DIST_TIMEOUT``, default 1800)."""
    try:
        return float(os.environ.get("CKPTMGR_DIST_TIMEOUT", "1800"))
    except ValueError:
        return 1800.0


def _control_group() -> Optional[Any]:
    """A gloo group for small CPU control messages.

    With a gloo default group we use it directly. With NCCL (or any other
    backend) CPU tensors cannot travel on the default group, so a gloo group
    over all ranks is created once; creating it is itself collective, which is
    safe because every caller of this module is a collective reached by all ranks.
    """
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _CONTROL_GROUPS:
        _CONTROL_GROUPS[key] = dist.new_group(backend="gloo")
    return _CONTROL_GROUPS[key]


def _wait(work: Any, timeout: Optional[float], what: str) -> None:
    """Wait for an async collective, raising DistributedError past the deadline or on failure."""
    deadline = time.monotonic() + (default_timeout() if timeout is None else timeout)
    delay = 0.0005
    try:
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"{what}: other ranks did not answer within {timeout or default_timeout():.0f}s",
                    "a rank probably died or is stuck; check every rank's log, or raise "
                    "CKPTMGR_DIST_TIMEOUT if the work is just slow")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        work.wait()
    except DistributedError:
        raise
    except Exception as exc:  # gloo reports a dead peer as a RuntimeError
        raise DistributedError(f"{what} failed: {exc}") from exc


def _group(group: Optional[Any]) -> Optional[Any]:
    return group if group is not None else _control_group()


def new_control_group() -> Any:
    """Create a private gloo group over all ranks (collective: every rank must call it, in the same order).

    Background threads use such a group so their collectives never interleave
    with the training loop's collectives on the default group.
    """
    if not is_distributed():
        return None
    return dist.new_group(backend="gloo")


def _all_reduce(tensor: torch.Tensor, op: Any, timeout: Optional[float], what: str,
                group: Optional[Any] = None) -> torch.Tensor:
    work = dist.all_reduce(tensor, op=op, group=_group(group), async_op=True)
    _wait(work, timeout, what)
    return tensor


def barrier(timeout: Optional[float] = None, what: str = "barrier", group: Optional[Any] = None) -> None:
    """Block until every rank arrives, or raise DistributedError after ``timeout`` seconds."""
    if is_distributed() and get_world_size() > 1:
        _all_reduce(torch.zeros(1, dtype=torch.int32), dist.ReduceOp.SUM, timeout, what, group)


def all_agree(ok: bool, timeout: Optional[float] = None, what: str = "agreement",
              group: Optional[Any] = None) -> bool:
    """Return True only when ``ok`` is True on every rank."""
    if not (is_distributed() and get_world_size() > 1):
        return bool(ok)
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    return bool(_all_reduce(flag, dist.ReduceOp.MIN, timeout, what, group).item())


def _encode(obj: Any) -> torch.Tensor:
    data = json.dumps(obj).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def broadcast_json(obj: Any = None, src: int = 0, timeout: Optional[float] = None,
                   what: str = "broadcast", group: Optional[Any] = None) -> Any:
    """Send a JSON-serialisable value from ``src`` to every rank and return it everywhere."""
    if not (is_distributed() and get_world_size() > 1):
        return obj
    group = _group(group)
    payload = _encode(obj) if get_rank() == src else None
    size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.int64)
    _wait(dist.broadcast(size, src=src, group=group, async_op=True), timeout, what)
    buf = payload if payload is not None else torch.empty(int(size.item()), dtype=torch.uint8)
    _wait(dist.broadcast(buf, src=src, group=group, async_op=True), timeout, what)
    return json.loads(bytes(buf.numpy()).decode("utf-8"))


def all_gather_json(obj: Any, timeout: Optional[float] = None, what: str = "all_gather",
                    group: Optional[Any] = None) -> List[Any]:
    """Gather one JSON-serialisable value from every rank, in rank order."""
    if not (is_distributed() and get_world_size() > 1):
        return [obj]
    group = _group(group)
    world = get_world_size()
    payload = _encode(obj)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    _wait(dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64),
                          group=group, async_op=True), timeout, what)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    _wait(dist.all_gather(bufs, padded, group=group, async_op=True), timeout, what)
    return [json.loads(bytes(b[: int(s.item())].numpy()).decode("utf-8")) for b, s in zip(bufs, sizes)]


@contextlib.contextmanager
def rank_zero_first(local: bool = True, timeout: Optional[float] = None) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks.

    The usual use is a download: local rank 0 of each node fetches the file
    into the shared cache, then the other ranks find it there. If rank 0's body
    raises, the other ranks raise :class:`DistributedError` instead of running
    their body or waiting forever.

    Args:
        local: Lead with each node's local rank 0 (True) or only global rank 0.
        timeout: Seconds the followers wait; defaults to :func:`default_timeout`.

    Raises:
        DistributedError: on followers, when the leader failed or timed out.
    """
    if not (is_distributed() and get_world_size() > 1):
        yield
        return
    leader = is_rank_zero(local=local)
    what = "rank_zero_first"
    if leader:
        try:
            yield
        except BaseException:
            all_agree(False, timeout, what)
            raise
        all_agree(True, timeout, what)
    else:
        if not all_agree(True, timeout, what):
            raise DistributedError(
                f"{'local ' if local else ''}rank 0 failed inside rank_zero_first, so rank {get_rank()} stops too",
                "the root cause is in the leading rank's log")
        yield
