"""Conditional writes on S3: create-only (``If-None-Match: *``) and compare-and-swap (``If-Match: <ETag>``).

Two jobs saving into one prefix must not both commit a step, and a stale job
must not overwrite a step the newer one committed. S3 (and S3-compatible
servers that implement it) refuses a PUT carrying ``If-None-Match: *`` when
the key exists, and one carrying ``If-Match`` when the object's ETag changed,
atomically: of two racing writers exactly one succeeds. s3fs sends the first
for ``pipe_file(..., mode="create")`` and raises ``FileExistsError`` on a
refusal; the second goes through ``call_s3("put_object", IfMatch=...)``.

Not every S3-compatible server honours the headers: some ignore them (a
silent overwrite), some reject them. So before trusting them, a store probes
its bucket once per process: create a probe object, then create it again;
only a refused second create counts as support. Elsewhere the store falls
back to check-then-write (:class:`~ckptmgr.io.store.Store`).

A retried request can report a refusal for a write that landed (the first
attempt succeeded, its answer was lost, the retry found the object). So
after any failure the object is read back: if it holds exactly our bytes,
our write is the one that landed.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import threading
import uuid
from typing import Any, Dict, Optional, Tuple

from ..errors import CheckpointNotFoundError, WriteConflictError

logger = logging.getLogger(__name__)

__all__ = ["PROTOCOLS", "supported", "create", "read_tagged", "replace_if"]

#: Protocols whose filesystem sends S3's conditional headers.
PROTOCOLS = ("s3", "s3a")
_probed: Dict[Tuple[str, str], bool] = {}
_lock = threading.Lock()


def _bucket(store: Any) -> str:
    return str(store.fs.split_path(store.fs_path())[0])


def _read_or_none(store: Any, name: str) -> Optional[bytes]:
    try:
        return bytes(store.read_bytes(name))
    except CheckpointNotFoundError:
        return None


def supported(store: Any) -> bool:
    """True when the store's bucket honours create-only writes (probed once per endpoint and bucket).

    Raises:
        Exception: what the client raised when the probe could not be written (network, bucket missing);
            it is retried next time.
    """
    if store.protocol not in PROTOCOLS:
        return False
    key = (str(getattr(store.fs, "endpoint_url", "") or ""), _bucket(store))
    with _lock:
        if key not in _probed:
            _probed[key] = _probe(store)
            if not _probed[key]:
                logger.warning("%s does not honour S3 conditional writes (If-None-Match); two jobs saving into one "
                               "directory there are detected only by the owner lease", key[0] or "this S3 endpoint")
        return _probed[key]


def _rejected(exc: OSError) -> bool:
    """True for s3fs's translation of a 400 (invalid argument) or 501 (not implemented) answer."""
    return exc.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def _probe(store: Any) -> bool:
    name = f".ckptmgr-probe-{uuid.uuid4().hex}"
    path = store.fs_path(name)
    mine = uuid.uuid4().hex.encode()
    try:
        try:
            store.fs.pipe_file(path, mine, mode="create")
        except FileExistsError:  # only a retry of our own landed PUT can find the new name taken
            if _read_or_none(store, name) != mine:
                raise
        except OSError as exc:
            if not _rejected(exc):
                raise
            store.fs.pipe_file(path, mine)  # a plain PUT works: it was the header the server refused
            logger.info("conditional create refused by the server: %s", exc)
            return False
        try:
            store.fs.pipe_file(path, b"second", mode="create")
        except FileExistsError:
            return True
        except OSError as exc:
            if not _rejected(exc):
                raise  # a network failure is not an answer; the next save probes again
            logger.info("conditional create refused by the server: %s", exc)
            return False
        return False  # the header was ignored: the second create overwrote the first
    finally:
        with contextlib.suppress(Exception):
            store.fs.rm(path)


def create(store: Any, name: str, data: bytes) -> None:
    """PUT with ``If-None-Match: *``.

    Raises:
        WriteConflictError: the object exists (another writer's).
        Exception: what the client raised after its retries (the store makes it a StorageError).
    """
    try:
        store.fs.pipe_file(store.fs_path(name), data, mode="create")
    except Exception as exc:
        current = _read_or_none(store, name)
        if current == data:  # our write landed; a retry (or a lost answer) reported otherwise
            return
        if current is not None or isinstance(exc, FileExistsError):
            raise WriteConflictError(f"{store.uri(name)} was created by another writer first") from exc
        raise


def read_tagged(store: Any, name: str) -> Tuple[Optional[bytes], Optional[str]]:
    """Content and ETag; the ETag is read first, so a later change makes :func:`replace_if` refuse, not overwrite."""
    path = store.fs_path(name)
    store.fs.invalidate_cache(path)
    try:
        tag = store.fs.info(path).get("ETag")
    except FileNotFoundError:
        return None, None
    data = _read_or_none(store, name)
    return (data, str(tag)) if data is not None and tag else (None, None)


def replace_if(store: Any, name: str, data: bytes, tag: Optional[str]) -> None:
    """PUT with ``If-Match: tag`` (create-only when ``tag`` is None).

    Raises:
        WriteConflictError: the object changed, appeared or vanished since it was read.
        Exception: what the client raised after its retries (the store makes it a StorageError).
    """
    if tag is None:
        return create(store, name, data)
    path = store.fs_path(name)
    bucket, key, _ = store.fs.split_path(path)
    try:
        store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)
    except Exception as exc:
        if _read_or_none(store, name) == data:
            return
        error = getattr(getattr(exc, "__cause__", None), "response", None) or {}
        if isinstance(exc, FileNotFoundError) or error.get("Error", {}).get("Code") == "PreconditionFailed":
            raise WriteConflictError(f"{store.uri(name)} was changed by another writer since it was read") from exc
        raise
    finally:
        store.fs.invalidate_cache(path)
