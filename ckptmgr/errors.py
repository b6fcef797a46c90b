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
    "DistributedError", "UnserializableStateError", "DirectoryInUseError",
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


class CheckpointFormatError(CheckpointError, ValueError):
    """The file was read but does not hold what was asked for."""

    default_hint = "inspect the file with `ckptmgr inspect PATH` to see what it holds"


class UnknownSchemeError(CheckpointError, ValueError):
    """No loader is registered for the URL's scheme."""

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
