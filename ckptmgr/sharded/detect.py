"""Is a model sharded? Answered without importing DTensor, FSDP or DCP.

A model cannot hold a DTensor unless ``torch.distributed.tensor`` was imported
already (by FSDP2 or tensor parallelism), and it cannot be wrapped by FSDP1 or
FSDP2 unless ``torch.distributed.fsdp`` was; so :func:`has_dtensors` and
:func:`ckptmgr.state.engines.fsdp_kinds` look in ``sys.modules`` first and
import nothing: the manager's ``sharded="auto"`` check costs no import for the
common, unsharded case.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

from torch import nn

from ..errors import CheckpointFormatError
from ..state.engines import fsdp_kinds

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


def use_sharded(setting: Any, modules: Iterable[nn.Module]) -> bool:
    """Whether a save writes model and optimizer with DCP (``setting``: ``'auto'``, True or False).

    ``'auto'`` picks DCP when any of the ``modules`` holds DTensors or is
    wrapped (anywhere inside) by FSDP1 or FSDP2: their ``state_dict()`` is
    sharded, or a collective, so rank 0 cannot write it alone.

    Raises:
        CheckpointFormatError: ``setting`` is False but a module is wrapped by FSDP.
    """
    modules = list(modules)
    if setting is True:
        return True
    kinds = fsdp_kinds(modules)
    if setting is False:
        if kinds:
            raise CheckpointFormatError(f"the model is wrapped by {'/'.join(sorted(kinds)).upper()}, whose state "
                                        "only every rank together can save, but the manager has sharded=False",
                                        "create the CheckpointManager with sharded='auto' (the default) or True")
        return False
    return bool(kinds) or any(has_dtensors(m) for m in modules)
