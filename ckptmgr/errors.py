"""Typed errors for everything a user can get wrong.

Every exception carries a ``hint``: one sentence that says what to do about it.
Subclasses also derive from the builtin a caller would naturally catch
(``FileNotFoundError``, ``RuntimeError``, ...), so code written against the
OpenMMLab API keeps working.
"""
from __future__ import annotations

from typing import Optional

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "CheckpointExistsError",
    "CorruptCheckpointError", "ChecksumError", "UnsafeCheckpointError",
    "KeyMismatchError", "CheckpointFormatError", "UnknownSchemeError",
    "MissingDependencyError", "StorageError", "DownloadError",
    "DistributedError", "UnserializableStateError", "DirectoryInUseError", "FrozenParametersError",
    "WorldSizeChangedError", "PrefixNotFoundError", "NoStateDictError", "SaveArgumentError", "BackendArgumentError",
    "UnexpectedKeywordError", "SignatureError", "WriteConflictError",
]


class CheckpointError(Exception):
    """Base class of every ckptmgr error.

    Args:
        message: What went wrong.
        hint: What the user can do about it; appended to the message.
    """

    default_hint: str = ""

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        stop = "" if message.endswith((".", "!", "?")) else "."  # never "...." after an elided hash
        text = f"{message}{stop} Hint: {self.hint}" if self.hint else message
        super().__init__(text)

    def __reduce__(self):  # keep the two-argument constructor picklable across processes
        return (self.__class__, (self.message, self.hint))


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path, URL or step does not exist."""

    default_hint = "check the path or URL; `ckptmgr ls DIR` lists committed checkpoints"


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists for this step."""

    default_hint = "pass force=True to overwrite it, or save under another step"


class CorruptCheckpointError(CheckpointError, ValueError):
    """A file is truncated, garbled or not in a format ckptmgr can read."""

    default_hint = ("the file is damaged or incomplete: restore an older checkpoint "
                    "(`ckptmgr verify DIR` names every bad file)")


class ChecksumError(CorruptCheckpointError):
    """Bytes on storage do not match the recorded size or sha256."""

    default_hint = ("the bytes changed after they were written: restore an older checkpoint "
                    "(`ckptmgr verify DIR` names every damaged file)")


class UnsafeCheckpointError(CheckpointError):
    """Loading the file would execute arbitrary pickle code."""

    default_hint = ("if you trust the source of this file, pass trust_pickle=True; "
                    "better, convert it once with `ckptmgr convert SRC DST.safetensors`")


class KeyMismatchError(CheckpointError, RuntimeError):
    """A strict load found missing, unexpected or mis-shaped keys."""

    default_hint = ("pass strict=False to load what matches, or revise_keys=[(regex, repl)] "
                    "to rename the checkpoint's keys")


class FrozenParametersError(KeyMismatchError):
    """A checkpoint saved without its frozen parameters is restored into a model whose frozen part differs."""

    default_hint = ("restore into the model the run started from: load its base weights first (they are not in "
                    "this checkpoint), then restore")


class CheckpointFormatError(CheckpointError, ValueError):
    """The file was read but does not hold what was asked for."""

    default_hint = "inspect the file with `ckptmgr inspect PATH` to see what it holds"


class PrefixNotFoundError(CheckpointFormatError, AssertionError):
    """No key of the state dict starts with the prefix asked for.

    Also an ``AssertionError``: OpenMMLab's ``_load_checkpoint_with_prefix``
    asserts that the prefix is there, and callers catch that.
    """

    default_hint = "pass one of the listed prefixes"


class NoStateDictError(CheckpointFormatError, RuntimeError):
    """The file holds no state dict at all (a tensor, a list, ...).

    Also a ``RuntimeError``, what OpenMMLab's ``load_checkpoint`` raises for such a file.
    """

    default_hint = "pass a file holding model weights, or a dict with a 'state_dict' key"


class SaveArgumentError(CheckpointError, TypeError):
    """``save_checkpoint`` got something it cannot save in either calling convention."""

    default_hint = ("pass a module (mmcv form: save_checkpoint(model, filename, optimizer=None, meta=None)) or a "
                    "checkpoint dict (mmengine form: save_checkpoint(checkpoint, filename))")


class UnexpectedKeywordError(CheckpointError, TypeError):
    """A loading function got a keyword argument that neither it nor the chosen loader takes."""

    default_hint = "check the spelling of the keyword"


class BackendArgumentError(CheckpointError, ValueError):
    """``file_client_args`` / ``backend_args`` (OpenMMLab storage settings) that cannot be honoured."""

    default_hint = ("pass storage_options= (fsspec options) instead, or one of the backends "
                    "'disk', 'local', 'petrel', 's3', 'http'")


class UnknownSchemeError(CheckpointError, ValueError, FileNotFoundError):
    """No loader is registered for the URL's scheme.

    Also a ``FileNotFoundError``: OpenMMLab hands an unknown ``scheme://`` to its
    local loader, which raises that, so code written for it keeps catching it.
    """

    default_hint = "register one with CheckpointLoader.register_scheme('myscheme://', loader)"


class MissingDependencyError(CheckpointError, ImportError):
    """An optional package needed for this URL or feature is not installed."""


class StorageError(CheckpointError, OSError):
    """Reading or writing storage failed (permissions, disk full, network)."""

    default_hint = "check free space, permissions and credentials for the destination"


class DownloadError(StorageError):
    """A remote file could not be downloaded."""

    default_hint = "check the URL, your network, or set CKPTMGR_URL_MIRRORS to use a mirror"


class DistributedError(CheckpointError, RuntimeError):
    """Another rank failed or did not answer in time."""

    default_hint = "look at the other ranks' logs for the first error"


class UnserializableStateError(CheckpointError, TypeError):
    """State holds an object that cannot be stored without pickle."""

    default_hint = ("store plain Python values, tensors or numpy arrays, or give the object "
                    "state_dict()/load_state_dict() methods")


class DirectoryInUseError(CheckpointError, RuntimeError):
    """Another job (another CheckpointManager) is saving into the same directory."""

    default_hint = ("two jobs must not save into one directory: stop the other job, or give this one its own "
                    "directory")


class WorldSizeChangedError(CheckpointError, RuntimeError):
    """The step holds per-rank state of another number of ranks than this job has."""

    default_hint = ("restore with the number of ranks that saved it, or pass on_world_size_change='skip' to "
                    "restore everything else and leave rank_state as it is")


class SignatureError(CorruptCheckpointError):
    """A signing key was given and a step's manifest is unsigned, signed with another key, or altered.

    It derives from :class:`CorruptCheckpointError`, so restoring the latest
    step skips such a step as it skips a damaged one.
    """

    default_hint = ("restore only steps your own job signed: pass the key they were signed with "
                    "(signing_key= or CKPTMGR_SIGNING_KEY), or restore another step; a step that fails the check "
                    "was written by another job or changed after it was written")


class WriteConflictError(StorageError, FileExistsError):
    """A conditional write lost: another writer created or changed the object first."""

    default_hint = "another job wrote to the same place at the same moment; only one job may save into a directory"
