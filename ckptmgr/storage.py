"""The one place that touches storage: fsspec filesystems and the local disk.

Everything above this module speaks URIs (a local path, ``file://``, ``s3://``,
``memory://``, ...). Writes are atomic per backend:

* local: a temp file in the destination directory, fsync, ``os.replace``,
  fsync of the directory, so a crash leaves either the old file or the new one;
* object stores (S3, GCS, Azure): the upload is opened with
  ``autocommit=False`` and only completed (``commit``) when the writer finished
  without error; otherwise it is aborted (``discard``) and nothing appears;
* any other fsspec filesystem: a temp name beside the target, then ``mv``.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import uuid
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple

from .errors import CheckpointError, CheckpointNotFoundError, MissingDependencyError, StorageError

logger = logging.getLogger(__name__)

__all__ = [
    "split_protocol", "has_scheme", "get_fs", "is_local", "local_path", "atomic_write", "open_read",
    "exists", "isdir", "size", "listdir", "makedirs", "remove", "fsync_dir", "join",
    "list_files", "read_many", "make_dir", "rename_dir", "exchange_dirs",
]

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def split_protocol(uri: str) -> Tuple[Optional[str], str]:
    """Split ``'s3://b/k'`` into ``('s3', 'b/k')``; a plain path gives ``(None, path)``."""
    match = _SCHEME_RE.match(uri)
    if not match:
        return None, uri
    return match.group(1).lower(), uri[match.end():]


def has_scheme(uri: str) -> bool:
    """True when ``uri`` starts with ``scheme://``."""
    return bool(_SCHEME_RE.match(uri))


def _missing_backend(protocol: str, exc: Exception) -> MissingDependencyError:
    from fsspec.registry import known_implementations  # (the attribute fsspec.registry is a mapping)
    known = known_implementations.get(protocol, {})
    hint = known.get("err") or f"install the fsspec backend package for '{protocol}://'"
    return MissingDependencyError(f"no usable fsspec backend for '{protocol}://' ({exc})", hint)


def get_fs(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> Tuple[Any, str]:
    """Return ``(filesystem, path)`` for a URI, with storage options applied.

    Raises:
        MissingDependencyError: the protocol's backend package is not installed.
    """
    import fsspec.core
    protocol, _ = split_protocol(uri)
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        _s3_endpoint_from_env(options)
        _s3_retry_defaults(options)
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        raise _missing_backend(protocol or "file", exc) from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise _missing_backend(protocol or "file", exc) from exc
        raise


def _s3_endpoint_from_env(options: Dict[str, Any]) -> None:
    # botocore reads AWS_ENDPOINT_URL itself only from 1.31 on; pass it explicitly
    # so the documented variable works with every botocore s3fs may bring along.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
        options["endpoint_url"] = endpoint


S3_RETRIES = {"max_attempts": 5, "mode": "standard"}


def _s3_retry_defaults(options: Dict[str, Any]) -> None:
    # botocore's default ("legacy", 5 attempts) does not back off on every throttling answer;
    # "standard" retries 503 SlowDown, resets and timeouts with jittered back-off. A caller's
    # config_kwargs={'retries': {...}} wins.
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_RETRIES))
    options["config_kwargs"] = config


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    protocol, _ = split_protocol(uri)
    return protocol in (None, "file", "local")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (``file:///x`` -> ``/x``), user-expanded."""
    return os.path.expanduser(split_protocol(uri)[1] if is_local(uri) else uri)


def join(base: str, *parts: str) -> str:
    """Join path components onto a URI or path with ``/``."""
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        out = f"{out}/{part.strip('/')}" if out else part
    return out


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


def _storage_error(uri: str, exc: OSError) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageError(f"writing {uri} failed: out of space ({exc})", "free space or pick another destination")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"writing {uri} failed: permission denied ({exc})",
                            "check write permissions and credentials for the destination")
    return StorageError(f"writing {uri} failed: {exc}")


_CLIENT_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "gcsfs", "adlfs"}


def _from_client(exc: BaseException) -> bool:
    """True for an error an object-store client raised (not the caller's, not already typed)."""
    if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
        return False
    return type(exc).__module__.split(".")[0] in _CLIENT_PACKAGES or isinstance(exc, (OSError, TimeoutError))


def _remote_error(uri: str, exc: Exception) -> StorageError:
    """A typed error for what an object store's client raised after its own retries (network, throttling)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _storage_error(uri, exc)
    return StorageError(f"writing {uri} failed after the client's retries: {type(exc).__name__}: {exc}",
                        "check the network and the endpoint; raise retries with storage_options="
                        "{'config_kwargs': {'retries': {'max_attempts': N, 'mode': 'standard'}}}")


@contextlib.contextmanager
def atomic_write(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> Iterator[IO[bytes]]:
    """Open ``uri`` for writing so the file appears complete or not at all.

    Parent directories are created. If the body raises, any previous file at
    ``uri`` is untouched and no partial file is left under the final name.

    Raises:
        StorageError: an OS-level failure (disk full, permission denied) while writing or committing.
    """
    if is_local(uri):
        with _atomic_write_local(local_path(uri)) as fh:
            yield fh
        return
    fs, path = get_fs(uri, storage_options)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    protocol = split_protocol(uri)[0]
    if protocol not in OBJECT_STORES and parent:
        fs.makedirs(parent, exist_ok=True)
    if protocol in OBJECT_STORES:
        try:
            fh = fs.open(path, "wb", autocommit=False)
        except Exception as exc:
            raise _remote_error(uri, exc) from exc
        try:
            yield fh
            fh.close()
            fh.commit()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                fh.discard()
            # fsspec files close themselves when garbage-collected, and closing a
            # discarded upload would start a new one; mark it closed instead.
            fh.closed = True
            if _from_client(exc):
                raise _remote_error(uri, exc) from exc
            raise  # the caller's own error (the body of the with-block) passes through unchanged
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open(tmp, "wb") as fh:
            yield fh
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


@contextlib.contextmanager
def _atomic_write_local(path: str) -> Iterator[IO[bytes]]:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual file mode
    except OSError as exc:
        raise _storage_error(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):  # typed errors pass through
            raise _storage_error(path, exc) from exc
        raise
    fsync_dir(directory)


@contextlib.contextmanager
def open_read(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> Iterator[IO[bytes]]:
    """Open ``uri`` for binary reading.

    Raises:
        CheckpointNotFoundError: nothing exists at ``uri``.
        StorageError: it exists but cannot be read (a directory, permissions).
    """
    try:
        if is_local(uri):
            fh = open(local_path(uri), "rb")
        else:
            fs, path = get_fs(uri, storage_options)
            fh = fs.open(path, "rb")
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"no such file: {uri}") from exc
    except IsADirectoryError as exc:
        raise StorageError(f"{uri} is a directory, not a file", "pass a checkpoint file or a manager directory") from exc
    except PermissionError as exc:
        raise StorageError(f"cannot read {uri}: permission denied", "check permissions and credentials") from exc
    with fh:
        yield fh


def exists(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> bool:
    """True when a file or directory exists at ``uri``."""
    if is_local(uri):
        return os.path.exists(local_path(uri))
    fs, path = get_fs(uri, storage_options)
    return fs.exists(path)


def isdir(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> bool:
    """True when ``uri`` is a directory (or an object-store prefix with objects under it)."""
    if is_local(uri):
        return os.path.isdir(local_path(uri))
    fs, path = get_fs(uri, storage_options)
    return fs.isdir(path)


def size(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Size of the file at ``uri`` in bytes.

    Raises:
        CheckpointNotFoundError: nothing exists at ``uri``.
    """
    try:
        if is_local(uri):
            return os.path.getsize(local_path(uri))
        fs, path = get_fs(uri, storage_options)
        return int(fs.size(path))
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"no such file: {uri}") from exc


def listdir(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> List[str]:
    """Names (not paths) of the entries directly inside ``uri``; empty when it does not exist."""
    if is_local(uri):
        try:
            return sorted(os.listdir(local_path(uri)))
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache(path)  # object-store listings are cached by s3fs; we need the truth
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/")})


def makedirs(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Create a directory and its parents (a no-op on object stores)."""
    if is_local(uri):
        os.makedirs(local_path(uri), exist_ok=True)
        return
    fs, path = get_fs(uri, storage_options)
    if split_protocol(uri)[0] not in OBJECT_STORES:
        fs.makedirs(path, exist_ok=True)


def remove(uri: str, recursive: bool = False, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Delete a file (or a directory tree with ``recursive``); a missing target is not an error."""
    if is_local(uri):
        import shutil
        p = local_path(uri)
        with contextlib.suppress(FileNotFoundError):
            if recursive and os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        return
    fs, path = get_fs(uri, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


# --------------------------------------------------------------------------- directory commits
# Helpers for CheckpointManager's commit protocol: a checkpoint is a directory,
# written under a temporary name and renamed into place (local), or a prefix whose
# manifest object is written last (object stores).


def list_files(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """Every file below ``uri``, recursively, as ``{relative/path: size}``; empty when ``uri`` does not exist."""
    out: Dict[str, int] = {}
    if is_local(uri):
        root = local_path(uri)
        for dirpath, _, names in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for name in names:
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                with contextlib.suppress(FileNotFoundError):
                    out[key] = os.path.getsize(os.path.join(dirpath, name))
        return out
    fs, path = get_fs(uri, storage_options)
    path = path.rstrip("/")
    fs.invalidate_cache(path)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return out
    for name, info in found.items():
        name = name.rstrip("/")
        if info.get("type", "file") == "file" and name.startswith(path + "/"):
            out[name[len(path) + 1:]] = int(info.get("size") or 0)
    return out


def read_many(uris: List[str], storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read several small files at once (concurrently on object stores).

    Returns:
        ``{uri: bytes}``, or ``{uri: exception}`` for a file that could not be read
        (``FileNotFoundError`` when it does not exist).
    """
    out: Dict[str, Any] = {}
    remote: Dict[str, str] = {}
    for uri in uris:
        if is_local(uri):
            try:
                with open(local_path(uri), "rb") as fh:
                    out[uri] = fh.read()
            except OSError as exc:
                out[uri] = exc
        else:
            remote[get_fs(uri, storage_options)[1]] = uri
    if remote:
        fs, _ = get_fs(next(iter(remote.values())), storage_options)
        try:
            got = fs.cat(list(remote), on_error="return")
        except Exception as exc:  # a whole-batch failure (network): report it for every file
            got = {path: exc for path in remote}
        if not isinstance(got, dict):  # a single path comes back as bare bytes
            got = {next(iter(remote)): got}
        for path, uri in remote.items():
            out[uri] = got.get(path, FileNotFoundError(path))
    return out


def make_dir(uri: str) -> None:
    """Create one new local directory (its parent must exist).

    Raises:
        StorageError: it exists already, or the OS refused.
    """
    try:
        os.mkdir(local_path(uri))
    except OSError as exc:
        raise _storage_error(uri, exc) from exc


def rename_dir(src: str, dst: str) -> None:
    """Rename a local directory to a name that does not exist yet, then fsync the parent(s).

    Raises:
        StorageError: the rename failed (``dst`` exists and is not empty, permissions, ...).
    """
    src_p, dst_p = local_path(src), local_path(dst)
    try:
        os.rename(src_p, dst_p)
    except OSError as exc:
        raise _storage_error(dst, exc) from exc
    for parent in {os.path.dirname(os.path.abspath(src_p)), os.path.dirname(os.path.abspath(dst_p))}:
        fsync_dir(parent)


_RENAME_EXCHANGE = 2  # from linux/fs.h


def exchange_dirs(a: str, b: str) -> bool:
    """Atomically swap two existing local paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Python has no binding for renameat2, so it is called through ctypes; every
    other platform, and filesystems that refuse the flag, get False and the
    caller falls back to two renames.

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
    at_fdcwd = -100
    a_p, b_p = local_path(a), local_path(b)
    rc = func(at_fdcwd, os.fsencode(a_p), at_fdcwd, os.fsencode(b_p), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            return False
        raise _storage_error(b, OSError(err, os.strerror(err), b_p))
    fsync_dir(os.path.dirname(os.path.abspath(b_p)))
    return True
