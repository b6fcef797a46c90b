"""Is a model sharded? Answered without importing DTensor, FSDP or DCP.

A model cannot hold a DTensor unless ``torch.distributed.tensor`` was imported
already (by FSDP2 or tensor parallelism), so :func:`has_dtensors` looks in
``sys.modules`` first and imports nothing: the manager's ``sharded="auto"``
check costs no import for the common, unsharded case.
"""
from __future__ import annotations

import sys
from typing import Any

from torch import nn

__all__ = ["SETTINGS", "check_setting", "has_dtensors", "use_sharded"]

SETTINGS = ("auto", True, False)


def check_setting(value: Any) -> Any:
    """Validate ``CheckpointManager(sharded=...)``.

    Raises:
        ValueError: not ``'auto'``, True or False.
    """
    if (isinstance(value, str) and value == "auto") or value is True or value is False:
        return value
    raise ValueError(f"sharded must be 'auto', True or False, got {value!r}")


def has_dtensors(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def use_sharded(setting: Any, model: nn.Module) -> bool:
    """Whether a save writes model and optimizer with DCP (``setting``: ``'auto'``, True or False)."""
    return setting is True or (setting == "auto" and has_dtensors(model))
