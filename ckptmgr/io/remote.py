"""fsspec filesystems as a Store: object stores (S3, GCS, Azure, ...) and any other fsspec protocol.

Object stores have no rename and no partial objects: an upload is opened
with ``autocommit=False`` and completed (``commit``) only when the writer
finished without error, otherwise discarded, so nothing half-written ever
appears. Other fsspec filesystems (``memory://``, ...) write a temp name
beside the target, then ``mv``. Errors the client raises after its own
retries become :class:`~ckptmgr.errors.StorageError`; the caller's own
exceptions pass through unchanged. On S3 the conditional writes of
:class:`~ckptmgr.io.store.Store` are S3's own (:mod:`.conditional`).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple

from ..errors import CheckpointError, CheckpointNotFoundError, MissingDependencyError, StorageError, UnknownSchemeError
from . import conditional
from .local import opening, storage_error
from .store import Options, Store
from .uri import OBJECT_STORES, join, split_protocol

__all__ = ["FsspecStore", "get_fs", "fsspec_knows", "S3_RETRIES"]

#: botocore retry settings unless ``storage_options={'config_kwargs': {'retries': ...}}`` says otherwise.
S3_RETRIES = {"max_attempts": 5, "mode": "standard"}
_CLIENT_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "urllib3", "gcsfs", "adlfs"}


def fsspec_knows(protocol: str) -> bool:
    """True when fsspec has an implementation (installed or not) for ``protocol``."""
    # The attribute ``fsspec.registry`` is the mapping of loaded classes, shadowing the submodule.
    from fsspec.registry import known_implementations, registry
    return protocol in known_implementations or protocol in registry


def _missing_backend(protocol: str, exc: Exception) -> MissingDependencyError:
    from fsspec.registry import known_implementations
    known = known_implementations.get(protocol, {})
    hint = known.get("err") or f"install the fsspec backend package for '{protocol}://'"
    return MissingDependencyError(f"no usable fsspec backend for '{protocol}://' ({exc})", hint)


def _s3_options(options: Dict[str, Any]) -> None:
    # botocore reads AWS_ENDPOINT_URL itself only from 1.31 on; pass it explicitly so the
    # documented variable works with every botocore s3fs may bring along.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
        options["endpoint_url"] = endpoint
    # botocore's default ("legacy") does not back off on every throttling answer; "standard"
    # retries 503 SlowDown, resets and timeouts with jittered back-off. A caller's setting wins.
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", dict(S3_RETRIES))
    options["config_kwargs"] = config


def get_fs(uri: str, options: Options = None) -> Tuple[Any, str]:
    """``(filesystem, path)`` for a URL, with storage options (and S3 defaults) applied.

    Raises:
        MissingDependencyError: the protocol's backend package is not installed.
    """
    import fsspec.core
    protocol, _ = split_protocol(uri)
    opts = dict(options or {})
    if protocol in ("s3", "s3a"):
        _s3_options(opts)
    try:
        return fsspec.core.url_to_fs(uri, **opts)
    except ImportError as exc:
        raise _missing_backend(protocol or "file", exc) from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc):
            raise _missing_backend(protocol or "file", exc) from exc
        raise


def _from_client(exc: BaseException) -> bool:
    """True for an error an object-store client raised (not the caller's, not already typed)."""
    if isinstance(exc, CheckpointError) or not isinstance(exc, Exception):
        return False
    return type(exc).__module__.split(".")[0] in _CLIENT_PACKAGES or isinstance(exc, (OSError, TimeoutError))


def remote_error(uri: str, exc: Exception, doing: str = "writing") -> StorageError:
    """A typed error for what an object store's client raised after its own retries."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return storage_error(uri, exc)
    text = str(exc)
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StorageError(f"{doing} {uri} failed: the bucket does not exist",
                            "create the bucket, or check its name and the endpoint (AWS_ENDPOINT_URL)")
    return StorageError(f"{doing} {uri} failed after the client's retries: {type(exc).__name__}: {exc}",
                        "check the network and the endpoint; raise retries with storage_options="
                        "{'config_kwargs': {'retries': {'max_attempts': N, 'mode': 'standard'}}}")


@contextlib.contextmanager
def _reading(uri: str) -> Iterator[None]:
    """Turn what a read of ``uri`` raises into typed errors: a missing object, or a client failure after its
    retries (:func:`remote_error`); errors already typed pass through."""
    try:
        yield
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"no such file: {uri}") from exc
    except CheckpointError:
        raise
    except Exception as exc:
        if _from_client(exc):
            raise remote_error(uri, exc, "reading") from exc
        raise


class FsspecStore(Store):
    """A directory (prefix) on an fsspec filesystem; steps commit by writing the manifest last."""

    commit_style = "manifest-last"
    is_local = False

    def __init__(self, root: str, options: Options = None) -> None:
        super().__init__(root, options)
        self.protocol = split_protocol(root)[0] or "file"
        self._fs: Any = None
        self._base = ""

    @classmethod
    def for_uri(cls, uri: str, options: Options = None) -> "FsspecStore":
        """The store for ``uri``.

        Raises:
            UnknownSchemeError: fsspec knows no protocol of that name.
        """
        protocol = split_protocol(uri)[0] or "file"
        if not fsspec_knows(protocol):
            raise UnknownSchemeError(f"no storage backend for '{protocol}://' in {uri!r} (fsspec knows no such "
                                     "protocol; it is not a local path either)",
                                     "use a local path or an fsspec URL such as s3://bucket/dir")
        return cls(uri, options)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (created on first use; fsspec caches instances per options)."""
        if self._fs is None:
            self._fs, self._base = get_fs(self.root, self.options)
        return self._fs

    @property
    def object_store(self) -> bool:
        """True for S3, GCS, Azure and the like (uploads, no directories)."""
        return self.protocol in OBJECT_STORES

    def fs_path(self, *names: str) -> str:
        """The path of a name as the filesystem object wants it (no protocol)."""
        self.fs  # noqa: B018 - resolves the base path once
        return join(self._base, *names)

    @contextlib.contextmanager
    def open_read(self, name: str = "") -> Iterator[IO[bytes]]:
        uri, path = self.uri(name), self.fs_path(name)
        # s3fs reads with If-Match on the ETag it listed; an object replaced since then must be read afresh
        self.fs.invalidate_cache(path)
        with _reading(uri), opening(uri, "check permissions and credentials"):
            fh = self.fs.open(path, "rb")
        with fh:
            yield fh

    def read_range(self, name: str, start: int, length: int) -> bytes:
        # One ranged GET: a buffered file object would read ahead a whole block (MiBs) for a header.
        uri = self.uri(name)
        with _reading(uri):
            return bytes(self.fs.cat_file(self.fs_path(name), start=start, end=start + length))

    @contextlib.contextmanager
    def atomic_write(self, name: str = "") -> Iterator[IO[bytes]]:
        uri, path = self.uri(name), self.fs_path(name)
        if not self.object_store:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                with self.fs.open(tmp, "wb") as fh:
                    yield fh
                self.fs.mv(tmp, path)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.fs.rm(tmp)
                raise
            return
        try:
            fh = self.fs.open(path, "wb", autocommit=False)
        except Exception as exc:
            raise remote_error(uri, exc) from exc
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
            if isinstance(exc, Exception) and _from_client(exc):
                raise remote_error(uri, exc) from exc
            raise  # the caller's own error (the body of the with-block) passes through unchanged

    def conditional_writes(self) -> bool:
        """True on S3 buckets that honour ``If-None-Match``/``If-Match`` (probed once per endpoint and bucket)."""
        return bool(self._client_call("", conditional.supported))

    def _client_call(self, name: str, func: Any, *args: Any) -> Any:
        """``func(self, *args)``; what the client raises after its retries becomes a StorageError about ``name``."""
        try:
            return func(self, *args)
        except CheckpointError:
            raise
        except Exception as exc:
            raise remote_error(self.uri(name), exc) from exc

    def create_exclusive(self, name: str, data: bytes) -> None:
        if not self.conditional_writes():
            return super().create_exclusive(name, data)
        self._client_call(name, conditional.create, name, data)

    def read_tagged(self, name: str) -> Tuple[Optional[bytes], Optional[str]]:
        if not self.conditional_writes():
            return super().read_tagged(name)
        data, tag = self._client_call(name, conditional.read_tagged, name)
        return data, tag

    def replace_if(self, name: str, data: bytes, tag: Optional[str]) -> None:
        if not self.conditional_writes():
            return super().replace_if(name, data, tag)
        self._client_call(name, conditional.replace_if, name, data, tag)

    def exists(self, name: str = "") -> bool:
        return bool(self.fs.exists(self.fs_path(name)))

    def isdir(self, name: str = "") -> bool:
        return bool(self.fs.isdir(self.fs_path(name)))

    def size(self, name: str = "") -> int:
        try:
            return int(self.fs.size(self.fs_path(name)))
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"no such file: {self.uri(name)}") from exc

    def listdir(self, name: str = "") -> List[str]:
        path = self.fs_path(name).rstrip("/")
        self.fs.invalidate_cache(path)  # object-store listings are cached by s3fs; we need the truth
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path})

    def list_files(self, name: str = "") -> Dict[str, int]:
        out: Dict[str, int] = {}
        path = self.fs_path(name).rstrip("/")
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return out
        for entry, info in found.items():
            entry = entry.rstrip("/")
            if info.get("type", "file") == "file" and entry.startswith(path + "/"):
                out[entry[len(path) + 1:]] = int(info.get("size") or 0)
        return out

    def read_many(self, names: List[str]) -> Dict[str, Any]:
        if not names:
            return {}
        paths = {self.fs_path(name): name for name in names}
        try:
            got = self.fs.cat(list(paths), on_error="return")
        except Exception as exc:  # a whole-batch failure (network): report it for every file
            got = {path: exc for path in paths}
        if not isinstance(got, dict):  # a single path comes back as bare bytes
            got = {next(iter(paths)): got}
        return {name: got.get(path, FileNotFoundError(path)) for path, name in paths.items()}

    def makedirs(self, name: str = "") -> None:
        if not self.object_store:
            self.fs.makedirs(self.fs_path(name), exist_ok=True)

    def remove(self, name: str = "", recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.fs_path(name), recursive=recursive)
