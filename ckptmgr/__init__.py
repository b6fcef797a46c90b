"""ckptmgr: checkpoints for PyTorch training that never lose a run.

Public API only; see README.md for a tour.
"""
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
from .version import __version__

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
