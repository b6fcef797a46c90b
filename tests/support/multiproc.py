"""Run a function on N real gloo ranks (separate processes) and collect what each returned or raised."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Tuple


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, queue, env):
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # report everything to the parent, it decides
        result = ("err", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    queue.put((rank, result))
    queue.close()
    queue.join_thread()
    # Skip destroy_process_group: a peer may be dead on purpose and a clean shutdown would wait for it.
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 90,
              env: dict | None = None) -> List[Tuple[str, Any]]:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; returns ``[(status, value)]`` by rank.

    ``status`` is ``'ok'`` (value returned) or ``'err'`` (exception text), or
    ``'died'`` for a rank that exited without reporting (e.g. killed on purpose).
    ``fn`` must be importable (a module-level function).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue, dict(env or {})))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    import queue as queue_mod
    import time
    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, result = queue.get(timeout=0.5)
            results[rank] = result
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    return [results.get(r, ("died", None)) for r in range(world)]
