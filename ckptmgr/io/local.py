"""The local filesystem as a Store: atomic files, durable renames, and the directory tricks commits need.

A file is written to a temp file in its destination directory, fsynced,
``os.replace``d onto its name, and the directory fsynced, so a crash leaves
either the old file or the new one. Step directories are committed by
renaming a temporary directory into place (and fsyncing the parent); a
committed step is replaced with one atomic ``renameat2(RENAME_EXCHANGE)``
where the kernel has it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import IO, Any, Dict, Iterator, List

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, StorageError, WriteConflictError
from .store import Store
from .uri import local_path
from .writeback import open_writeback

__all__ = ["LocalStore", "fsync_dir", "storage_error"]


def fsync_dir(path: str) -> None:
    """fsync a local directory so a rename or delete inside it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def storage_error(uri: str, exc: OSError) -> StorageError:
    """A typed error, with the fix, for an OS error while writing ``uri``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"writing {uri} failed: out of space ({exc})", "free space or pick another destination")
    if exc.errno == errno.EFBIG:
        return StorageError(f"writing {uri} failed: the file is larger than this filesystem or the process's "
                            f"file-size limit allows ({exc})",
                            "raise the limit (`ulimit -f`, RLIMIT_FSIZE) or write to a filesystem without it")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"writing {uri} failed: permission denied ({exc})",
                            "check write permissions and credentials for the destination")
    return StorageError(f"writing {uri} failed: {exc}")


@contextlib.contextmanager
def opening(where: str, permission_hint: str = "check permissions") -> Iterator[None]:
    """Turn what opening ``where`` for reading raises (missing, a directory, no permission) into typed errors."""
    try:
        yield
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"no such file: {where}") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{where} is a directory, not a file",
                           "pass a checkpoint file or a manager directory") from exc
    except PermissionError as exc:
        raise StorageError(f"cannot read {where}: permission denied", permission_hint) from exc


class LocalStore(Store):
    """A directory on a local (or network-mounted POSIX) filesystem."""

    commit_style = "rename"
    is_local = True

    def __init__(self, root: str, options: Any = None) -> None:
        super().__init__(os.path.abspath(local_path(root)) if root else root)

    def path(self, *names: str) -> str:
        """The filesystem path of a name below the root."""
        return os.path.join(self.root, *[n.strip("/") for n in names if n.strip("/")])

    @contextlib.contextmanager
    def open_read(self, name: str = "") -> Iterator[IO[bytes]]:
        path = self.path(name)
        with opening(path):
            fh = open(path, "rb")
        with fh:
            yield fh

    @contextlib.contextmanager
    def atomic_write(self, name: str = "") -> Iterator[IO[bytes]]:
        path = self.path(name)
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
            os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual file mode
        except OSError as exc:
            raise storage_error(path, exc) from exc
        try:
            with open_writeback(fd) as fh:  # its pages start going to disk while it is written
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):  # typed errors pass through
                raise storage_error(path, exc) from exc
            raise
        fsync_dir(directory)

    def create_exclusive(self, name: str, data: bytes) -> None:
        """Write a small file only if the name is free: a complete, fsynced temp file hard-linked to it.

        ``link`` fails when the target exists, so of two racing writers (processes
        or hosts on one POSIX filesystem) exactly one succeeds, and the file never
        appears partly written. Filesystems without hard links fall back to
        check-then-write.

        Raises:
            WriteConflictError: the name exists.
            StorageError: writing failed.
        """
        path = self.path(name)
        tmp = ""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
            os.fchmod(fd, 0o666 & ~_current_umask())
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)
        except FileExistsError as exc:
            raise WriteConflictError(f"{path} exists already") from exc
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):  # no hard links here
                return super().create_exclusive(name, data)
            raise storage_error(path, exc) from exc
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        fsync_dir(os.path.dirname(path))

    @contextlib.contextmanager
    def write_unpublished(self, name: str) -> Iterator[IO[bytes]]:
        path = self.path(name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode filtered by the umask
        except OSError as exc:
            raise storage_error(path, exc) from exc
        try:
            with open_writeback(fd) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
                raise storage_error(path, exc) from exc
            raise

    def exists(self, name: str = "") -> bool:
        return os.path.exists(self.path(name))

    def isdir(self, name: str = "") -> bool:
        return os.path.isdir(self.path(name))

    def size(self, name: str = "") -> int:
        try:
            return os.path.getsize(self.path(name))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"no such file: {self.path(name)}") from exc

    def listdir(self, name: str = "") -> List[str]:
        try:
            return sorted(os.listdir(self.path(name)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_files(self, name: str = "") -> Dict[str, int]:
        out: Dict[str, int] = {}
        root = self.path(name)
        for dirpath, _, names in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for entry in names:
                key = entry if rel == "." else f"{rel.replace(os.sep, '/')}/{entry}"
                with contextlib.suppress(FileNotFoundError):
                    out[key] = os.path.getsize(os.path.join(dirpath, entry))
        return out

    def read_many(self, names: List[str]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for name in names:
            try:
                with open(self.path(name), "rb") as fh:
                    out[name] = fh.read()
            except OSError as exc:
                out[name] = exc
        return out

    def makedirs(self, name: str = "") -> None:
        try:
            os.makedirs(self.path(name), exist_ok=True)
        except FileExistsError as exc:
            raise StorageError(f"{self.path(name)} exists and is not a directory",
                               "pass a directory path, or move that file out of the way") from exc
        except OSError as exc:
            raise storage_error(self.path(name), exc) from exc

    def remove(self, name: str = "", recursive: bool = False) -> None:
        path = self.path(name)
        with contextlib.suppress(FileNotFoundError):
            if recursive and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

    def sync_dir(self, name: str = "") -> None:
        fsync_dir(self.path(name))

    def check_inside(self, name: str) -> None:
        root = os.path.realpath(self.root)
        if not os.path.realpath(self.path(name)).startswith(root + os.sep):
            raise CorruptCheckpointError(f"{self.root}: {name} resolves outside the checkpoint directory; refusing "
                                         "to read it", "a step directory holds only its own files: remove the link")

    # ------------------------------------------------------------------ directory commits

    def make_dir(self, name: str) -> None:
        """Create one new directory (its parent must exist).

        Raises:
            StorageError: it exists already, or the OS refused.
        """
        try:
            os.mkdir(self.path(name))
        except OSError as exc:
            raise storage_error(self.path(name), exc) from exc

    def rename_dir(self, src: str, dst: str) -> None:
        """Rename a directory to a name that does not exist yet, then fsync the parent(s).

        Raises:
            StorageError: the rename failed (``dst`` exists and is not empty, permissions, ...).
        """
        src_p, dst_p = self.path(src), self.path(dst)
        try:
            os.rename(src_p, dst_p)
        except OSError as exc:
            raise storage_error(dst_p, exc) from exc
        for parent in {os.path.dirname(src_p), os.path.dirname(dst_p)}:
            fsync_dir(parent)

    def exchange_dirs(self, a: str, b: str) -> bool:
        """Atomically swap two existing directories (Linux ``renameat2(RENAME_EXCHANGE)``).

        Python has no binding for renameat2, so it is called through ctypes;
        other platforms, and filesystems that refuse the flag, get False and
        the caller falls back to two renames.

        Returns:
            True when the swap happened (and the parent directory was fsynced).

        Raises:
            StorageError: the kernel supports the call but it failed for another reason.
        """
        import ctypes
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            func = libc.renameat2
        except (OSError, AttributeError):
            return False
        at_fdcwd, rename_exchange = -100, 2  # from fcntl.h and linux/fs.h
        a_p, b_p = self.path(a), self.path(b)
        if func(at_fdcwd, os.fsencode(a_p), at_fdcwd, os.fsencode(b_p), rename_exchange) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                return False
            raise storage_error(b_p, OSError(err, os.strerror(err), b_p))
        fsync_dir(os.path.dirname(b_p))
        return True
