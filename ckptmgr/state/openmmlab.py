"""Wrapper classes registered in OpenMMLab's own registries, found without importing OpenMMLab.

Code written for mmengine registers its model wrappers in ``MODEL_WRAPPERS``
(``mmengine.registry``), code written for mmcv 1.x in ``MODULE_WRAPPERS``
(``mmcv.parallel``); their ``get_state_dict`` then unwraps any instance of a
registered class through ``.module``, whether it is an ``nn.Module`` or not.
ckptmgr honours those registrations so such code moves over unchanged, but
only reads the registries of packages that are already imported: a model
wrapped by an mmengine wrapper implies mmengine is imported, and importing
it ourselves would cost seconds and pull in its dependencies.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, List, Tuple

__all__ = ["upstream_wrapper_classes"]

#: (module name, attribute) of each registry, looked up in sys.modules only.
_REGISTRIES: Tuple[Tuple[str, str], ...] = (
    ("mmengine.registry", "MODEL_WRAPPERS"),
    ("mmcv.parallel", "MODULE_WRAPPERS"),
    ("mmcv.parallel.registry", "MODULE_WRAPPERS"),
)


def _classes(registry: Any, depth: int = 0) -> Iterator[type]:
    """Every class in ``registry`` and its child registries (mmengine/mmcv ``Registry`` surface)."""
    if depth > 16:  # registries form a tree; a cycle would be a bug elsewhere, never hang on it
        return
    module_dict = getattr(registry, "module_dict", None)
    if isinstance(module_dict, dict):
        yield from (cls for cls in module_dict.values() if isinstance(cls, type))
    children = getattr(registry, "children", None)
    if isinstance(children, dict):
        for child in children.values():
            yield from _classes(child, depth + 1)


def _is_fsdp(cls: type) -> bool:
    # FSDP (mmengine's MMFullyShardedDataParallel) keeps flat parameters behind `.module`;
    # its state dict needs FSDP's own state-dict machinery, so it is never peeled off here.
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    return isinstance(fsdp, type) and issubclass(cls, fsdp)


def upstream_wrapper_classes() -> Tuple[type, ...]:
    """The wrapper classes registered in mmengine's / mmcv's registries, if those packages are imported.

    Returns:
        A tuple of classes (empty when neither package is imported); their
        instances keep the wrapped model in ``.module``.
    """
    found: List[type] = []
    for module_name, attr in _REGISTRIES:
        registry = getattr(sys.modules.get(module_name), attr, None)
        if registry is None:
            continue
        for cls in _classes(registry):
            if cls not in found and not _is_fsdp(cls):
                found.append(cls)
    return tuple(found)
