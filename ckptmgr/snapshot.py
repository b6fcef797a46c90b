"""Async saves: reusable staging buffers and a background writer with back-pressure.

An async save has two halves. The training thread copies the state into CPU
staging buffers (the only part it waits for), then a background thread
serialises, writes, commits and applies retention. The buffers are reused from
one save to the next, so memory never grows past one staged copy; at most one
save is in flight, and a second ``submit`` waits for the first. An exception in
the background is kept and raised on the next ``submit``, ``wait`` or ``close``.
"""
from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["StagingBuffers", "BackgroundWriter"]


class StagingBuffers:
    """CPU copies of named tensors, allocated once and refilled on every save.

    Args:
        pin_memory: Page-lock the buffers so device-to-host copies run at full
            speed; defaults to True when CUDA is available.
    """

    def __init__(self, pin_memory: Optional[bool] = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: Dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def _buffer_for(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tensor.shape or buf.dtype != tensor.dtype:
            buf = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                              pin_memory=self.pin_memory and torch.cuda.is_available())
            self._buffers[name] = buf
        return buf

    def stage_tree(self, tree: Any) -> Any:
        """Copy a nested structure, tensors into their reused buffers, containers rebuilt.

        Training mutates optimizer state dicts and tensors in place, so the
        background writer must see neither the live tensors nor the live
        containers. Buffers are keyed by the tensor's path in the tree.
        """
        staged: Dict[str, torch.Tensor] = {}
        pending_sync = [False]

        def walk(node: Any, path: str) -> Any:
            if isinstance(node, torch.Tensor):
                src = node.detach()
                buf = self._buffer_for(path, src)
                non_blocking = src.device.type == "cuda" and buf.is_pinned()
                buf.copy_(src, non_blocking=non_blocking)
                pending_sync[0] = pending_sync[0] or non_blocking
                staged[path] = buf
                return buf
            if isinstance(node, Mapping):
                out = OrderedDict((k, walk(v, f"{path}/{k}")) for k, v in node.items())
                if hasattr(node, "_metadata"):
                    out._metadata = copy.deepcopy(getattr(node, "_metadata"))  # type: ignore[attr-defined]
                return out if isinstance(node, OrderedDict) else dict(out)
            if isinstance(node, (list, tuple)):
                items = [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
                if isinstance(node, list):
                    return items
                return tuple(items) if type(node) is tuple else type(node)(*items)  # namedtuples too
            return copy.deepcopy(node) if _mutable(node) else node

        out = walk(tree, "")
        if pending_sync[0]:
            torch.cuda.synchronize()
        for stale in set(self._buffers) - set(staged):
            del self._buffers[stale]
        return out

    def release(self) -> None:
        """Drop every buffer."""
        self._buffers.clear()


def _mutable(value: Any) -> bool:
    """True for values a training loop could change after save() returned (sets, arrays, dicts, ...)."""
    return not isinstance(value, (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device))


class BackgroundWriter:
    """Runs one job at a time on a background thread; errors surface on the next call.

    The thread is not a daemon: if the program ends while a save is running,
    the interpreter waits for it to finish instead of cutting it off.

    Args:
        name: Thread name (shows up in stack dumps).
    """

    def __init__(self, name: str = "ckptmgr-writer") -> None:
        self.name = name
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as exc:  # kept for the caller's next submit/wait/close
            logger.error("background checkpoint write failed: %s", exc)
            self._error = exc

    def submit(self, job: Callable[[], Any]) -> None:
        """Wait for the running job (back-pressure), re-raise its error if any, then start ``job``.

        Raises:
            BaseException: whatever the previous job raised.
        """
        with self._lock:
            self._join_and_raise()
            self._thread = threading.Thread(target=self._run, args=(job,), name=self.name, daemon=False)
            self._thread.start()

    def wait(self) -> None:
        """Block until the running job is done; re-raise its error if it failed."""
        with self._lock:
            self._join_and_raise()

    def _join_and_raise(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    close = wait
