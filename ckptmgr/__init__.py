"""ckptmgr: checkpoints for PyTorch training that never lose a run.

Public API only; see README.md for a tour. Names load on first use (PEP 562),
so ``import ckptmgr`` costs nothing before torch is needed, and the ``ckptmgr``
command lists and verifies manager directories (JSON manifests) without torch.
``from ckptmgr import X``, ``ckptmgr.X``, ``__all__`` and ``dir()`` work as usual.
"""
from __future__ import annotations

import importlib
import importlib.util
import types
from typing import TYPE_CHECKING, Any, Dict, List

from .version import __version__

#: Public name -> the module (relative to this package) that defines it.
_EXPORTS: Dict[str, str] = {
    **dict.fromkeys(["save_checkpoint", "load_checkpoint", "load_checkpoint_with_prefix"], ".checkpoint"),
    "rank_zero_first": ".distributed",
    **dict.fromkeys(["CheckpointError", "CheckpointNotFoundError", "CheckpointExistsError", "CorruptCheckpointError",
                     "ChecksumError", "UnsafeCheckpointError", "KeyMismatchError", "CheckpointFormatError",
                     "UnknownSchemeError", "MissingDependencyError", "StorageError", "DownloadError",
                     "DistributedError", "UnserializableStateError", "DirectoryInUseError", "FrozenParametersError",
                     "WorldSizeChangedError", "SignatureError"], ".errors"),
    "export": ".exporter",
    "CheckpointHook": ".hooks",
    "cached_path": ".hub.cache",
    "CheckpointLoader": ".loaders.registry",
    **dict.fromkeys(["CheckpointManager", "RestoredCheckpoint"], ".manager"),
    "resume_from_latest": ".resume",
    **dict.fromkeys(["LoadReport", "get_state_dict", "is_module_wrapper", "load_state_dict",
                     "register_module_wrapper", "unwrap_model", "weights_to_cpu"], ".state.modules"),
}

__all__ = [
    "__version__",
    "save_checkpoint", "load_checkpoint", "load_checkpoint_with_prefix",
    "load_state_dict", "get_state_dict", "weights_to_cpu", "LoadReport",
    "unwrap_model", "is_module_wrapper", "register_module_wrapper",
    "CheckpointLoader", "rank_zero_first",
    "CheckpointManager", "RestoredCheckpoint", "resume_from_latest", "cached_path", "CheckpointHook", "export",
    "CheckpointError", "CheckpointNotFoundError", "CheckpointExistsError", "CorruptCheckpointError",
    "ChecksumError", "UnsafeCheckpointError", "KeyMismatchError", "CheckpointFormatError",
    "UnknownSchemeError", "MissingDependencyError", "StorageError", "DownloadError", "DistributedError",
    "UnserializableStateError", "DirectoryInUseError", "FrozenParametersError", "WorldSizeChangedError",
    "SignatureError",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines a public name on first use, and keep the name here.

    Subpackages and modules (``ckptmgr.sharded``, ``ckptmgr.inventory``, ...) load the same way.
    """
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    """The public names, and the subpackages loaded so far."""
    loaded = {name for name, value in globals().items()
              if isinstance(value, types.ModuleType) and value.__name__.startswith(f"{__name__}.")}
    return sorted(set(__all__) | loaded)


if TYPE_CHECKING:  # the names as type checkers and IDEs should see them
    from .checkpoint import load_checkpoint, load_checkpoint_with_prefix, save_checkpoint
    from .distributed import rank_zero_first
    from .errors import (
        CheckpointError,
        CheckpointExistsError,
        CheckpointFormatError,
        CheckpointNotFoundError,
        ChecksumError,
        CorruptCheckpointError,
        DirectoryInUseError,
        DistributedError,
        DownloadError,
        FrozenParametersError,
        KeyMismatchError,
        MissingDependencyError,
        SignatureError,
        StorageError,
        UnknownSchemeError,
        UnsafeCheckpointError,
        UnserializableStateError,
        WorldSizeChangedError,
    )
    from .exporter import export
    from .hooks import CheckpointHook
    from .hub.cache import cached_path
    from .loaders.registry import CheckpointLoader
    from .manager import CheckpointManager, RestoredCheckpoint
    from .resume import resume_from_latest
    from .state.modules import (
        LoadReport,
        get_state_dict,
        is_module_wrapper,
        load_state_dict,
        register_module_wrapper,
        unwrap_model,
        weights_to_cpu,
    )
