"""Store: storage bound to a root URI and its options.

Code above this layer never passes ``(uri, storage_options)`` pairs around:
it holds a Store and names files relative to its root (``""`` is the root
itself). Two kinds implement it, :class:`~ckptmgr.io.local.LocalStore` and
:class:`~ckptmgr.io.remote.FsspecStore`; their ``commit_style`` tells the
step layer how a directory of files becomes visible at once (``"rename"``: a
temporary directory renamed into place; ``"manifest-last"``: the data objects
first, then the one object whose PUT is the commit).

Two jobs writing one directory must not both win a commit, so a store also
offers conditional writes: :meth:`Store.create_exclusive` (write only if the
name is free) and :meth:`Store.read_tagged` / :meth:`Store.replace_if` (write
only if nobody changed it since it was read). Where the backend has them
(S3 and S3-compatible servers that honour ``If-None-Match``/``If-Match``),
:meth:`Store.conditional_writes` is True and exactly one of two racing writers
succeeds; elsewhere they check and then write, which narrows the window
without closing it.

:mod:`ckptmgr.io.access` opens the right kind for a URI.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
from typing import IO, Any, ClassVar, Dict, List, Optional, Tuple

from ..errors import CheckpointNotFoundError, WriteConflictError
from .uri import join

__all__ = ["Store", "Options"]

Options = Optional[Dict[str, Any]]


class Store(abc.ABC):
    """A directory on some storage, and the file operations ckptmgr needs there.

    Args:
        root: Local path or fsspec URL of the directory (it need not exist yet).
        options: fsspec storage options (credentials, endpoint); ignored locally.

    Attributes:
        commit_style: ``"rename"`` or ``"manifest-last"`` (see the module docstring).
        is_local: True for the local filesystem.
    """

    commit_style: ClassVar[str]
    is_local: ClassVar[bool]

    def __init__(self, root: str, options: Options = None) -> None:
        self.root = root.rstrip("/") if root not in ("/", "") and not root.endswith("://") else root
        self.options: Options = dict(options) if options else None

    # ------------------------------------------------------------------ naming

    def uri(self, *names: str) -> str:
        """The full URI of a name below the root."""
        return join(self.root, *names)

    def sub(self, *names: str) -> "Store":
        """A store of the same kind rooted at a subdirectory."""
        return type(self)(self.uri(*names), self.options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and type(other) is type(self) and other.root == self.root \
            and other.options == self.options

    def __hash__(self) -> int:
        return hash((type(self), self.root))

    # ------------------------------------------------------------------ files

    @abc.abstractmethod
    def open_read(self, name: str = "") -> "contextlib.AbstractContextManager[IO[bytes]]":
        """Open a file for binary reading.

        Raises:
            CheckpointNotFoundError: nothing exists there.
            StorageError: it exists but cannot be read (a directory, permissions).
        """

    @abc.abstractmethod
    def atomic_write(self, name: str = "") -> "contextlib.AbstractContextManager[IO[bytes]]":
        """Open a file for writing so it appears complete or not at all (parents are created).

        If the body raises, a previous file of that name is untouched and no
        partial file is left under it.

        Raises:
            StorageError: an OS or client failure while writing or committing.
        """

    def write_unpublished(self, name: str) -> "contextlib.AbstractContextManager[IO[bytes]]":
        """Open a file for writing in a directory no reader looks at until a later commit (a step being written).

        The commit makes it visible, so the file needs no atomicity of its own:
        where a kind can skip it (a local disk: no temporary name, no rename, no
        directory fsync per file; :meth:`sync_dir` once after the last file), it
        does. The bytes are durable when the block ends. By default the same as
        :meth:`atomic_write`.

        Raises:
            StorageError: an OS or client failure while writing.
        """
        return self.atomic_write(name)

    def read_bytes(self, name: str = "") -> bytes:
        """The whole content of a (small) file."""
        with self.open_read(name) as fh:
            return fh.read()

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of a file from offset ``start`` (fewer at its end), without reading the rest.

        Raises:
            CheckpointNotFoundError: nothing exists there.
        """
        with self.open_read(name) as fh:
            fh.seek(start)
            return fh.read(length)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a (small) file atomically."""
        with self.atomic_write(name) as fh:
            fh.write(data)

    # ------------------------------------------------------------------ conditional writes

    def conditional_writes(self) -> bool:
        """True when :meth:`create_exclusive` and :meth:`replace_if` are atomic on this backend."""
        return False

    def create_exclusive(self, name: str, data: bytes) -> None:
        """Write a small file only if nothing has that name yet.

        Here (no conditional write): check, then write atomically; two writers
        racing inside that window can both succeed. Kinds with a real
        conditional write override it.

        Raises:
            WriteConflictError: the name exists.
            StorageError: writing failed.
        """
        if self.exists(name):
            raise WriteConflictError(f"{self.uri(name)} exists already")
        self.write_bytes(name, data)

    def read_tagged(self, name: str) -> Tuple[Optional[bytes], Optional[str]]:
        """A small file's content and a tag of its version, for :meth:`replace_if`; ``(None, None)`` when missing."""
        try:
            data = self.read_bytes(name)
        except CheckpointNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, name: str, data: bytes, tag: Optional[str]) -> None:
        """Write a small file only if it is still the version :meth:`read_tagged` tagged ``tag`` (None: missing).

        Here (no conditional write): read, compare, then write atomically.

        Raises:
            WriteConflictError: it changed (or appeared, or vanished) since it was read.
            StorageError: writing failed.
        """
        if self.read_tagged(name)[1] != tag:
            raise WriteConflictError(f"{self.uri(name)} changed since it was read")
        self.write_bytes(name, data)

    @abc.abstractmethod
    def exists(self, name: str = "") -> bool:
        """True when a file or directory exists there."""

    @abc.abstractmethod
    def isdir(self, name: str = "") -> bool:
        """True for a directory (or an object-store prefix with objects under it)."""

    @abc.abstractmethod
    def size(self, name: str = "") -> int:
        """Bytes in a file.

        Raises:
            CheckpointNotFoundError: nothing exists there.
        """

    @abc.abstractmethod
    def listdir(self, name: str = "") -> List[str]:
        """Sorted names (not paths) directly inside a directory; empty when it does not exist."""

    @abc.abstractmethod
    def list_files(self, name: str = "") -> Dict[str, int]:
        """Every file below a directory, recursively, as ``{relative/path: size}``."""

    @abc.abstractmethod
    def read_many(self, names: List[str]) -> Dict[str, Any]:
        """Read several small files (concurrently where the backend can).

        Returns:
            ``{name: bytes}``, or ``{name: exception}`` for a file that could not be
            read (``FileNotFoundError`` when it does not exist).
        """

    @abc.abstractmethod
    def makedirs(self, name: str = "") -> None:
        """Create a directory and its parents (a no-op on object stores)."""

    @abc.abstractmethod
    def remove(self, name: str = "", recursive: bool = False) -> None:
        """Delete a file, or a directory tree with ``recursive``; a missing target is not an error."""

    def sync_dir(self, name: str = "") -> None:  # noqa: B027 - a no-op unless the kind has something to do
        """Make renames and deletes inside a directory durable (fsync locally; nothing to do elsewhere)."""

    def check_inside(self, name: str) -> None:  # noqa: B027 - a no-op unless the kind has links to follow
        """Refuse a name that resolves outside the root (a symlink out of a step directory).

        Raises:
            CorruptCheckpointError: it does (only local stores have links to follow).
        """
