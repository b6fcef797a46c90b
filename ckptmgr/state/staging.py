"""Staging for async saves: CPU copies of the state, in buffers reused from one save to the next.

An async save has two halves. The training thread copies the state into CPU
staging buffers (the only part it waits for); a background thread then
serialises, writes and commits the copy while training changes the originals.
The buffers are reused, so memory never grows past one staged copy.
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["StagingBuffers"]


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
                    out._metadata = copy.deepcopy(node._metadata)  # type: ignore[attr-defined]
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
