"""``map_location`` as ``torch.load`` understands it, applied to tensors read by ckptmgr's own readers."""
from __future__ import annotations

from typing import Any, Callable, Dict, Union

import torch

__all__ = ["MapLocation", "map_tensor"]

MapLocation = Union[None, str, torch.device, Dict[str, str], Callable[..., Any]]


def map_tensor(tensor: torch.Tensor, map_location: MapLocation) -> torch.Tensor:
    """Move a CPU tensor where ``map_location`` says (None: leave it on the CPU)."""
    if map_location is None:
        return tensor
    if isinstance(map_location, (str, torch.device)):
        return tensor.to(map_location)
    if isinstance(map_location, dict):
        return tensor.to(map_location.get("cpu", "cpu"))
    if callable(map_location):
        result = map_location(tensor, "cpu")
        return tensor if result is None else result
    raise TypeError(f"unsupported map_location {map_location!r}")
