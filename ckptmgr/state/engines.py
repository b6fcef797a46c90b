"""Training engines whose state is not a plain ``state_dict()`` of one process: how to recognise and collect them.

Some wrappers turn "give me your state" into a collective that every rank must
join: an FSDP1 model's ``state_dict()`` all-gathers (and its sharded variant
builds ShardedTensors with an all-gather of metadata), and a
``ZeroRedundancyOptimizer`` must ``consolidate_state_dict()`` on every rank
before one rank can read the full state. A checkpoint manager that asked only
rank 0 would hang. This module tells such engines apart without importing
them (a class that was never imported cannot have instances) and runs their
collective step.

FSDP1 and FSDP2 models are saved through DCP (see :mod:`ckptmgr.sharded`).
A ZeRO optimizer is consolidated on rank 0 at every save, written once like
any replicated optimizer (its consolidated state is an ordinary optimizer
state dict), and loaded on every rank, for any world size.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, List, Set

from torch import nn

__all__ = ["fsdp_kinds", "is_zero", "zero_optimizers", "consolidate", "load_optimizer", "structure_copy"]

_FSDP = "torch.distributed.fsdp"
_ZERO = "torch.distributed.optim.zero_redundancy_optimizer"


def fsdp_kinds(modules: Iterable[nn.Module]) -> Set[str]:
    """``{'fsdp1', 'fsdp2'}``: the FSDP flavours found anywhere inside ``modules``.

    Nothing is imported: when ``torch.distributed.fsdp`` is not in
    ``sys.modules`` no module can be wrapped by it. FSDP1 may wrap only inner
    submodules, so every submodule is looked at (a compiled model reaches its
    ``_orig_mod`` the same way).
    """
    fsdp = sys.modules.get(_FSDP)
    one = getattr(fsdp, "FullyShardedDataParallel", None)
    two = getattr(fsdp, "FSDPModule", None)
    if one is None and two is None:
        return set()
    kinds: Set[str] = set()
    for module in modules:
        for sub in module.modules():
            if one is not None and isinstance(sub, one):
                kinds.add("fsdp1")
            elif two is not None and isinstance(sub, two):
                kinds.add("fsdp2")
    return kinds


def is_zero(optimizer: Any) -> bool:
    """True for a ``torch.distributed.optim.ZeroRedundancyOptimizer`` (imports nothing)."""
    cls = getattr(sys.modules.get(_ZERO), "ZeroRedundancyOptimizer", None)
    return cls is not None and isinstance(optimizer, cls)


def zero_optimizers(named: Dict[str, Any]) -> List[str]:
    """Names of the ZeRO optimizers among ``{name: optimizer}``."""
    return [name for name, opt in named.items() if is_zero(opt)]


def consolidate(named: Dict[str, Any]) -> None:
    """Gather every ZeRO optimizer's full state on rank 0 (a collective: every rank calls it).

    Afterwards rank 0's ``state_dict()`` is the full, current state. It is
    called at every save, so the state is never stale; each rank sends its
    shard to every other rank (``consolidate_state_dict`` broadcasts), which
    costs O(world size x optimizer state) traffic and a transient copy.
    """
    for name in sorted(named):
        if is_zero(named[name]):
            named[name].consolidate_state_dict(to=0)


def structure_copy(tree: Any) -> Any:
    """A copy of the dicts and lists of ``tree`` that shares its tensors and leaves."""
    if isinstance(tree, dict):
        return type(tree)((k, structure_copy(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [structure_copy(v) for v in tree]
    return tree


def load_optimizer(optimizer: Any, state: Any) -> None:
    """``optimizer.load_state_dict(state)``; a ZeRO optimizer gets a copy (it overwrites what it does not own)."""
    optimizer.load_state_dict(structure_copy(state) if is_zero(optimizer) else state)
